# Two commands: `make demo` and `make test`. Both create .venv and install on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch is installed first so nothing pulls a multi-GB CUDA build.
# On a GPU machine: make TORCH_SPEC="torch==2.13.0" EXTRAS="dev,gpu" (pip then takes the CUDA wheel).
TORCH_SPEC ?= torch==2.13.0
EXTRAS  ?= dev
STAMP   := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# deepspeed's setup imports torch: build it against the torch installed above.
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# jemalloc keeps long ingests' RSS flat; fetched into .venv/lib only when the system lacks it.
	bash scripts/fetch_jemalloc.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	. $(BIN)/activate && folio demo

test: $(STAMP)
	. $(BIN)/activate && python -m pytest -q

bench: $(STAMP)
	. $(BIN)/activate && python -m bench.attention --quick

clean:
	rm -rf $(VENV) build *.egg-info
