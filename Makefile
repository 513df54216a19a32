# Set-up and entry points. `make run` and `make test` are the two commands of the README.
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test test-fast ui benchmarks browser

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

## create the environment, then run the embedded default end to end (prepare -> teacher -> reinforce -> train -> export -> evaluate -> register)
run: $(VENV)/.installed
	. $(VENV)/bin/activate && dvc repro && dvc push

## the whole test suite (unit + integration) on two pytest-xdist workers: 11.5-16 minutes on the 2-core development
## machine (four runs, 2026-12-07, the slowest on a slow day; 22-28 minutes in one process); `-n 0`: one process
test: $(VENV)/.installed browser
	$(PY) -m pytest

## headless Chromium for the browser test (Debian's chromium + chromium-driver), installed when missing and root
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
		apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } || \
		echo "could not install chromium: the browser test will be skipped"; \
	else echo "chromium/chromium-driver missing and not root: the browser test will be skipped"; fi

## unit tests only
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

## the MLflow UI on the local results, at http://127.0.0.1:5000
ui: $(VENV)/.installed
	@$(VENV)/bin/lightclip tracking url --ui http://127.0.0.1:5000 --set tracking.uri=sqlite:///mlflow.db
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

benchmarks: $(VENV)/.installed
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/loader_throughput.py
