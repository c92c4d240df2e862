# The few things a person does with this project.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch on machines without a GPU; override on GPU hosts: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0+cpu
ARGS ?=
TEST_WORKERS ?= auto

# The real tritonserver (python backend only), unpacked from the nvidia-pytriton wheel; never pip-installed.
TRITON := artifacts/triton/pytriton/tritonserver/bin/tritonserver

.PHONY: setup run test ui bench quality triton serve stop deploy query loadtest clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,int8]"

setup: $(PY)  ## create .venv and install the project

run: $(PY)  ## the main job on the embedded default (synthetic data, CPU or GPU)
	$(PY) -m pipeline stage=all precision=fp16 $(ARGS)

test: $(PY)  ## the test suite (CPU), one worker per core; a test file stays on one worker (its fixtures are built once)
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile $(ARGS)

ui: $(PY)  ## MLflow UI on http://127.0.0.1:5000
	$(PY) -m mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(CURDIR)/artifacts/mlflow.db \
		--default-artifact-root $(CURDIR)/artifacts/mlruns

bench: $(PY)  ## the standard workload, every variant on this device (retrieval-cpu here, retrieval-1m on a GPU)
	$(PY) -m pipeline.bench.run $(ARGS)

quality: $(PY)  ## HR@10 and top-K of every headline variant against fp32 eager (ARGS="--checkpoint PATH" or "--train ...")
	$(PY) -m pipeline.bench.quality $(ARGS)

$(TRITON): | $(PY)
	$(PY) -m pipeline.serving install

triton: $(TRITON)  ## tritonserver under artifacts/triton (downloads the nvidia-pytriton wheel, about 55 MB)

serve: $(TRITON)  ## start the local Triton server on 127.0.0.1 (ports: conf/serving), in the background
	$(PY) -m pipeline.serving start $(ARGS)

stop:  ## stop the local Triton server that make serve (or make deploy) started
	$(PY) -m pipeline.serving stop $(ARGS)

deploy: $(TRITON)  ## champion -> Triton model repository -> local server (started if needed), smoke-tested
	$(PY) -m pipeline stage=deploy $(ARGS)

query: $(PY)  ## recommendations from the server for a test history, compared with the pipeline's own
	$(PY) -m pipeline.client --check $(ARGS)

loadtest: $(PY)  ## bounded concurrent load on loopback: throughput, p50/p99, errors, server metrics
	$(PY) -m pipeline.serving.loadtest $(ARGS)

clean:  ## remove everything the pipeline wrote (keeps .venv)
	find artifacts -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
