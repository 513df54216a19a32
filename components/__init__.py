"""Kubeflow Pipelines components, one file per stage: lightweight Python components on the project image that call the
stage bodies in `lightclip_core.pipeline.bodies` (which run the same stage functions as `lightclip <stage>`)."""
