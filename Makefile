# The two commands of the README: `make demo` and `make test` (everything; what CI runs). `make test-quick`:
# the inner loop, without the tests marked slow or browser (pytest.ini).
PY := .venv/bin/python

.PHONY: setup demo test test-quick bench

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m data.demo

# pytest-xdist: one worker per core, at most 4; the tests of the small demo share one worker (tests/conftest.py),
# the other session fixtures (small caches) are built by each worker that needs them.
XDIST := -n auto --maxprocesses 4 --dist loadgroup

test: setup
	$(PY) -m pytest -q $(XDIST)

test-quick: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow and not browser"

bench: setup
	$(PY) bench/bench_engine.py
