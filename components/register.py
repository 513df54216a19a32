from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(params: str, run_id: str, model: Input[Model], evaluation: Input[Markdown], checkpoint: Input[Model],
             train: Input[Dataset], test: Input[Dataset], decision: Output[Markdown]):
    """Register the evaluated model in MLflow; `champion` moves only if it beats the current one."""
    from lightclip_core.pipeline import bodies

    bodies.register(params, run_id, model, evaluation, checkpoint, train, test, decision)
