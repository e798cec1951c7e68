# OmniMRI Node — the two commands of the README's quick start, and a few for developers.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
APT_PACKAGES := dcmtk orthanc orthanc-dicomweb chromium chromium-driver
PYTEST_ARGS ?=

.PHONY: run install install-test test lint typecheck bench

## Install the node and run it on the shipped config.yaml (SQLite, local spool, ONNX Runtime CPU).
run: install
	omnimri-node serve --config config.yaml

install:
	$(PIP) install -q -e .

## Install what the tests need (Debian dcmtk, orthanc, orthanc-dicomweb, chromium + driver; Python extras) and run them all.
test: install-test
	$(PYTHON) -m pytest $(PYTEST_ARGS)

install-test:
	@if command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi
	$(PIP) install -q -e '.[test,train]'

lint:
	ruff check dicom_node inference export tests benchmarks
	mypy

bench: install-test
	$(PYTHON) benchmarks/ingest.py
