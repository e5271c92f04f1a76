# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,fts]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unfreeze-hpo search

test: $(STAMP)
	$(VENV)/bin/ruff check unfreeze_hpo tests benchmarks
	$(VENV)/bin/ruff format --check unfreeze_hpo tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

format: $(STAMP)
	$(VENV)/bin/ruff format unfreeze_hpo tests benchmarks
	$(VENV)/bin/ruff check --fix unfreeze_hpo tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
