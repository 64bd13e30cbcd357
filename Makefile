# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (once) and install the project into it.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[benchmark,export,dev]'
	touch $(STAMP)

.PHONY: setup browser demo test smoke-paper
setup: $(STAMP)

# tests/test_mlflow_ui.py renders the MLflow UI in headless Chromium, a Debian package rather than a pip one:
# installed here when `$(CHROMIUM)` is not on PATH (as root, or through sudo), so `make test` needs nothing else.
CHROMIUM ?= chromium
browser:
	@command -v $(CHROMIUM) >/dev/null || { \
	    sudo=""; if [ "$$(id -u)" -ne 0 ]; then sudo="sudo"; fi; \
	    $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# The whole benchmark on the profile named in params.yaml (the offline demo by default):
# every stage of dvc.yaml; the tables and figures land in reports/<profile>/README.md.
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/dvc repro

# Two pytest workers, one file each at a time (--dist loadfile keeps a module's shared fixtures
# in one process): the end-to-end `dvc repro` test leaves the second core mostly idle.
test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

# Before a real paper run: the paper profile at its real size (random weights, one class per
# dataset, one step per training) through `dvc repro` in .smoke/clone; per stage and per variant
# wall time and peak memory (benchmarks/smoke_paper.py). 86 minutes on a 2-core CPU, minutes on a GPU.
smoke-paper: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.smoke_paper
