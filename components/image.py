"""The project image every component runs on (`base_image`), chosen when the pipeline is compiled:
`python pipelines/full.py compile --image REGISTRY/lightclip:TAG` sets LIGHTCLIP_IMAGE before the components are
imported. Build it from infra/ (see docs/KUBEFLOW.md)."""
import os

DEFAULT_IMAGE = "ghcr.io/lightclip/lightclip:0.1.0-cuda"
IMAGE = os.environ.get("LIGHTCLIP_IMAGE") or DEFAULT_IMAGE
# kfp itself is in the image (a project dependency): components never pip-install anything at run time

