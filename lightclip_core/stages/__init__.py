"""The stages: one `run_<stage>` function per step of the pipeline, called by every door (the `lightclip` command
line, DVC's `cmd:`, the Kubeflow component bodies). Each takes the validated configuration and its inputs and
outputs as keyword arguments (local paths or `s3://` URIs), checks the inputs before any work, opens the stage's
MLflow run, calls the work, publishes the outputs and returns a small result whose `summary()` the CLI prints."""
from lightclip_core.stages.data import (run_index_reinforced, run_prepare, run_publish_reinforced, run_reinforce,
                                        run_teacher)
from lightclip_core.stages.evaluation import run_evaluate, run_register
from lightclip_core.stages.io import InputError
from lightclip_core.stages.model import run_export, run_train

__all__ = ["InputError", "run_evaluate", "run_export", "run_index_reinforced", "run_prepare",
           "run_publish_reinforced", "run_register", "run_reinforce", "run_teacher", "run_train"]
