"""Launchers that run stages elsewhere: multi-node training as a Kubeflow Trainer v2 TrainJob."""
from lightclip_core.launch.manifests import (API_CALLS, AlreadyExists, ApiUnavailable, LaunchConfigError, LaunchError,
                                             TrainJobFailed, TrainJobSpec, TrainJobTimeout, build_params_configmap,
                                             build_trainjob, load_params, required_permissions)
from lightclip_core.launch.trainjob import TrainJobLauncher

__all__ = ["API_CALLS", "AlreadyExists", "ApiUnavailable", "LaunchConfigError", "LaunchError", "TrainJobFailed",
           "TrainJobLauncher", "TrainJobSpec", "TrainJobTimeout", "build_params_configmap", "build_trainjob",
           "load_params", "required_permissions"]
