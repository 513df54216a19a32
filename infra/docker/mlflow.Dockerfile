# The MLflow tracking server: PostgreSQL backend store (psycopg2), S3 artifact store with proxied uploads (boto3),
# the basic-auth app (the `auth` extra: Flask-WTF).
# Build:  docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/lightclip/mlflow:3.17.2 infra/docker
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install "mlflow[auth]==3.17.2" psycopg2-binary==2.9.13 boto3==1.43.117 \
    && useradd --create-home --uid 1000 --user-group mlflow
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
