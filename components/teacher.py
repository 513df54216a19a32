from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def teacher(params: str, storage_root: str, train: Input[Dataset], model: Output[Model]):
    """Train the embedded default's teachers (the CoCa captioner and a second CLIP) on the training split."""
    from lightclip_core.pipeline import bodies

    bodies.teacher(params, storage_root, train, model)
