from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(params: str, storage_root: str, train: Output[Dataset], test: Output[Dataset]):
    """Generate or ingest the dataset into shards in object storage; the artifacts hold the split manifests."""
    from lightclip_core.pipeline import bodies

    bodies.prepare(params, storage_root, train, test)
