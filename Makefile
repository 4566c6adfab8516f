# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedmsk-installed

.PHONY: demo test lint install browser clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedmsk demo

# The report's browser test opens report.html in Debian's headless Chromium: installed here when
# missing and this machine allows it (root with apt, as in CI); elsewhere that test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing Debian's chromium for the report's browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } || \
		echo "make: could not install chromium; the browser test will be skipped"; \
	else \
		echo "make: no chromium (install Debian's chromium package); the browser test will be skipped"; \
	fi

# pytest exits 5 when it collects no tests: fail loudly rather than by accident. The slowest
# tests are listed at the end, so that a CI log shows where the 25-minute budget goes.
# Two pytest workers (pytest-xdist), one test file each at a time so that a module's fixture
# (a deployment, a federation) is built once: the tests run torch on one thread and the
# deployment tests spend minutes waiting on heartbeats and process start-up, so a second
# worker uses the core they leave idle (2 cores: 15:58 with passive OpenMP threads, below,
# against 21:13 in one process).
# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP workers sleep at once instead of spinning for the
# next parallel region; two torch processes on two cores otherwise steal each other's core
# (two 1-epoch pooled runs side by side: 296 s each, 45 s passive; docs/benchmarks.md).
TEST_WORKERS ?= 2
test: $(STAMP) browser
	@OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo runs outputs multirun
