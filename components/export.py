from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(params: str, storage_root: str, run_id: str, checkpoint: Input[Model], model: Output[Model]):
    """Fold the multi-branch blocks and export safetensors, torch.export and ONNX, parity-checked."""
    from lightclip_core.pipeline import bodies

    bodies.export(params, storage_root, run_id, checkpoint, model)
