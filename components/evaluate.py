from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(params: str, storage_root: str, run_id: str, model: Input[Model], test: Input[Dataset],
             checkpoint: Input[Model], metrics: Output[Metrics], confusion: Output[ClassificationMetrics],
             report: Output[Markdown]) -> bool:
    """Zero-shot classification and retrieval; returns whether the model passes the evaluation gate."""
    from lightclip_core.pipeline import bodies

    return bodies.evaluate(params, storage_root, run_id, model, test, checkpoint, metrics, confusion, report)
