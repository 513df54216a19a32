# The project image, CPU variant: Kubeflow components (base_image) and CPU training nodes.
# Build from the repository root:
#   docker build -f infra/docker/cpu.Dockerfile -t ghcr.io/lightclip/lightclip:0.1.0-cpu .
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv \
    && useradd --create-home --uid 1000 --user-group lightclip
# torch first, from the CPU wheel index (the same pins as pyproject.toml; tests/test_infra.py checks they agree)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
WORKDIR /opt/lightclip
COPY pyproject.toml README.md ./
COPY lightclip_core ./lightclip_core
RUN pip install . && lightclip --help > /dev/null
USER 1000:1000
WORKDIR /home/lightclip
ENTRYPOINT ["lightclip"]
