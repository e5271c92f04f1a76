# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all bench wheel lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,fts,trackers,real]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unfreeze-hpo search

test: $(STAMP)
	$(VENV)/bin/ruff check unfreeze_hpo tests benchmarks
	$(VENV)/bin/ruff format --check unfreeze_hpo tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# Everything, with the long reliability and load tests (~15 min on 2 cores).
test-all: $(STAMP)
	$(PY) -m pytest -q -m "full or not full"

# Every benchmark in full, one after another on a quiet machine (over 2 hours on 2 cores); the
# figures go to docs/benchmarks.md by hand, with the machine line each script prints.
BENCHMARKS := worker_overhead frozen_savings orchestration pruning_replay search_quality \
	embedded_transfer real_transfer loaders throughput data_parallel
bench: $(STAMP)
	for b in $(BENCHMARKS); do echo "== $$b"; $(PY) benchmarks/$$b.py || exit 1; done

# The wheel the cluster templates install (cluster/README.md): dist/unfreeze_hpo-<version>-*.whl.
wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

format: $(STAMP)
	$(VENV)/bin/ruff format unfreeze_hpo tests benchmarks
	$(VENV)/bin/ruff check --fix unfreeze_hpo tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
