# One command to run the bot, one to test it. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# uv installs .venv from uv.lock (every package, pinned, with hashes). It lives in a directory of its own, .uv/, not
# in .venv: `uv sync` makes .venv exactly what the lock lists, so it would remove an unlocked uv from there (and a
# .venv it recreates would take the running uv with it). Its version and hashes are in tools/uv-requirements.txt.
UV_HOME := .uv
UV := $(UV_HOME)/bin/uv
# The machine's Python, never one uv downloads; the project's environment is .venv in the checkout.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | cksum | cut -d' ' -f1)

.PHONY: run test test-fast lint format install lock system-deps clean bench

# The machine's pip installs uv straight into .uv/ (uv is one binary; a venv with a pip of its own would cost more
# CPU time than the whole `uv sync`); a Python without pip gets a throwaway venv for it.
$(UV): tools/uv-requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "wabot needs Python >= 3.11 (set PYTHON=python3.11)")'
	rm -rf $(UV_HOME)
	if $(PYTHON) -m pip --version >/dev/null 2>&1; then pip="$(PYTHON) -m pip"; \
	else $(PYTHON) -m venv $(UV_HOME)/pip-venv && pip=$(UV_HOME)/pip-venv/bin/pip; fi; \
	PIP_ROOT_USER_ACTION=ignore $$pip install -q --disable-pip-version-check --no-warn-script-location \
		--require-hashes --target $(UV_HOME) -r tools/uv-requirements.txt
	touch $@

# --locked: installs exactly uv.lock, and fails (rather than resolving anew) if pyproject.toml has changed since
# the lock was made; `make lock` then brings the lock up to date. --compile-bytecode, as pip does: with
# PYTHONDONTWRITEBYTECODE set (it is on the machines this project runs on), every process the tests start would
# otherwise compile openai, twilio and OpenTelemetry anew (about 2.5 s of CPU each).
$(STAMP): pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --extra dev --compile-bytecode --python $(PYTHON)
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# After editing the dependencies in pyproject.toml. `make lock LOCK_ARGS=--upgrade` moves every package to the
# newest release pyproject.toml allows.
lock: $(UV)
	$(UV) lock --python $(PYTHON) $(LOCK_ARGS)

system-deps:
	@tools/system-deps.sh

# Without an OpenAI key (in the environment or .env) the bot runs against the local simulator and Twilio sink.
run: install
	@if [ -n "$$OPENAI_API_KEY" ] || grep -qs '^OPENAI_API_KEY=.' .env; then \
		exec $(BIN)/wabot serve; \
	else \
		echo "OPENAI_API_KEY is not set: starting the local demo (try: $(BIN)/wabot send \"Hello\")"; \
		exec $(BIN)/wabot serve --demo; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole suite (CI's), on every core: pytest-xdist. The tests marked `exclusive` load every core and measure a
# deadline while they do: they run afterwards, one at a time, with nothing else alive (not even another worker's
# module-scoped Prometheus or demo process). TEST_WORKERS=0: one process. Two workers per core: most tests wait (a
# deadline, a retry, a Prometheus evaluation) far more than they compute, and the few that keep a core busy throughout
# are one xdist group, run one after another (tests/conftest.py, CPU_BOUND), so at most one of them loads a core at a
# time. More workers than that gained little and made the 1 s deadline tests fail now and then (measured: the suite's
# own section of docs/benchmarks.md).
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) * 2 )))
# With bytecode written (__pycache__/, ignored by git): every worker and every process a test starts would otherwise
# compile the project's modules, and pytest rewrite and compile every test module, anew (collection alone: about
# 6 s of CPU per worker).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest
test: install system-deps lint
	$(UV) lock --check --python $(PYTHON)
	$(PYTEST) -n $(TEST_WORKERS) --dist loadgroup -m "not exclusive"
	$(PYTEST) -n 0 -m exclusive

# The inner loop: everything but the browser, Prometheus/Alertmanager/promtool and the slow tests (load, memory,
# real deadlines). Needs only redis-server. Exit code 5 (no test selected) fails like any other.
test-fast: install
	$(PYTEST) -n $(TEST_WORKERS) --dist loadgroup -m "not browser and not prometheus and not slow"

# Speed, not behaviour: runs the bot, stubs and wrk (installed from Debian's package if missing) on 127.0.0.1 for
# about 55 minutes (half of it under callgrind) and rewrites docs/benchmarks.md. BENCH_QUICK=1 makes it a
# three-minute smoke run.
bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(UV_HOME) .pytest_cache .ruff_cache .mypy_cache wabot.db*
