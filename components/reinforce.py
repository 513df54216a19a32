"""The reinforce stage as a fan-out: plan shard groups, reinforce each group (ParallelFor), publish the manifest once."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_reinforce(train: Input[Dataset], groups: int) -> list:
    """Contiguous shard ranges `A:B` of the training split, one per reinforcement worker."""
    from lightclip_core.pipeline import bodies

    return bodies.shard_groups(train, groups)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def reinforce(params: str, storage_root: str, train: Input[Dataset], teacher: Input[Model], shards: str) -> str:
    """Reinforce one shard group: augmentations, synthetic captions and teacher embeddings, shard by shard."""
    from lightclip_core.pipeline import bodies

    return bodies.reinforce_group(params, storage_root, train, teacher, shards)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def publish_reinforced(params: str, storage_root: str, train: Input[Dataset], teacher: Input[Model], groups: list,
                       reinforced: Output[Dataset]):
    """The join: rebuild the reinforced split's manifest from every group's entries, once."""
    from lightclip_core.pipeline import bodies

    bodies.publish_reinforced(params, storage_root, train, teacher, reinforced)
