from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def local_gpus(nodes: int, gpus: int) -> int:
    """GPUs the training task itself needs: all of them on one node, none when it only launches a TrainJob."""
    return gpus if nodes <= 1 else 0


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(params: str, storage_root: str, run_id: str, data: Input[Dataset], nodes: int, gpus: int, image: str,
          gpu_resource: str, node_selector: dict, tolerations: list, shm_size: str, checkpoint: Output[Model],
          metrics: Output[Metrics]):
    """Train on this node (torchrun over its GPUs when there are several) or, with nodes > 1, through a TrainJob."""
    from lightclip_core.pipeline import bodies

    placement = {"gpu_resource": gpu_resource, "node_selector": node_selector, "tolerations": tolerations,
                 "shm_size": shm_size}  # of the TrainJob's nodes when nodes > 1 (CPU and memory: resources.train)
    bodies.train(params, storage_root, run_id, data, nodes, gpus, image, placement, checkpoint, metrics)
