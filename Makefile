# The few things a person does with this project.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch on machines without a GPU; override on GPU hosts: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0+cpu
ARGS ?=

.PHONY: setup run test ui bench deploy clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"

setup: $(PY)  ## create .venv and install the project

run: $(PY)  ## the main job on the embedded default (synthetic data, CPU or GPU)
	$(PY) -m pipeline stage=all precision=fp16 $(ARGS)

test: $(PY)  ## the test suite (CPU)
	$(PY) -m pytest -q $(ARGS)

ui: $(PY)  ## MLflow UI on http://127.0.0.1:5000
	$(PY) -m mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(CURDIR)/artifacts/mlflow.db \
		--default-artifact-root $(CURDIR)/artifacts/mlruns

bench: $(PY)  ## latency of every variant on this device
	$(PY) -m pipeline stage=validate $(ARGS)

deploy: $(PY)  ## champion -> Triton Inference Server
	@echo "deploy: not built yet (issue: validate, promote, deploy)"; exit 2

clean:  ## remove everything the pipeline wrote (keeps .venv)
	find artifacts -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
