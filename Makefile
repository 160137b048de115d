# The two commands of the README: `make demo` and `make test` (everything; what CI runs). `make test-quick`:
# the inner loop, without the tests marked slow or browser (pytest.ini).
PY := .venv/bin/python

.PHONY: setup demo test test-quick bench

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m data.demo

# pytest-xdist: one worker per core, at most 4; each worker builds the session fixtures it needs (the small demo, the
# small caches). Putting the small demo's tests on one worker (--dist loadgroup) gained nothing measurable here
# (981 and 1,124 s against 924 and 968 s; again on 2026-12-07: 519 s against 500 s), so the plain distribution
# stays. Three workers on this 2-core machine: 1,055 s against 1,024 s for two (every core busy either way).
XDIST := -n auto --maxprocesses 4

# The tests marked `alone` (pytest.ini) measure CPU seconds: they run after the others, with nothing beside them;
# the 1,000-class cache they read is built by the parallel run and kept in build/tests/ (tests/test_browser_classes.py).
# Each stage's temporary files go to its own folder in build/pytest/ (emptied when the stage starts again), not to
# pytest's numbered folders in the system's temporary directory: those are shared by every run on the machine,
# and each session deletes the oldest beyond three at its end -- here a run of this suite leaves 58,000 files (680 MB)
# and deleting 55,654 of them took 33 s at the end of a one-test session (2026-12-07). A fresh clone deletes nothing.
TMP := build/pytest
test: setup
	mkdir -p $(TMP)
	$(PY) -m pytest -q -rs $(XDIST) -m "not alone" --basetemp $(TMP)/parallel
	$(PY) -m pytest -q -rs -m alone --basetemp $(TMP)/alone

test-quick: setup
	mkdir -p $(TMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow and not browser" --basetemp $(TMP)/quick

bench: setup
	$(PY) bench/bench_engine.py
