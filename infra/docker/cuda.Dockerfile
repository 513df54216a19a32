# The project image, CUDA variant: GPU training (the TrainJob's nodes, the pipeline's train step) and GPU stages.
# Build from the repository root:
#   docker build -f infra/docker/cuda.Dockerfile -t ghcr.io/lightclip/lightclip:0.1.0-cuda .
# The PyPI torch wheels bundle their CUDA libraries; the base gives the CUDA runtime layout the NVIDIA container
# toolkit expects (driver libraries are mounted from the node).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# ubuntu 24.04 ships a user "ubuntu" with uid 1000: remove it so that uid 1000 is ours in every image
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --user-group lightclip
# the same pins as pyproject.toml (tests/test_infra.py checks they agree)
RUN pip install torch==2.14.1 torchvision==0.29.1
WORKDIR /opt/lightclip
COPY pyproject.toml README.md ./
COPY lightclip_core ./lightclip_core
RUN pip install . && lightclip --help > /dev/null
USER 1000:1000
WORKDIR /home/lightclip
ENTRYPOINT ["lightclip"]
