# One command to run the bot, one to test it. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: run test test-fast lint format install system-deps clean bench

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "wabot needs Python >= 3.11 (set PYTHON=python3.11)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

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

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole suite (CI's), on every core: pytest-xdist. A test marked `exclusive` (it loads every core) runs while
# no other does (tests/conftest.py); those share one worker (xdist_group "heavy"). TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto
test: install system-deps lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

# The inner loop: everything but the browser, Prometheus/Alertmanager/promtool and the slow tests (load, memory,
# real deadlines). Needs only redis-server. Exit code 5 (no test selected) fails like any other.
test-fast: install
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup -m "not browser and not prometheus and not slow"

# Speed, not behaviour: runs the bot, stubs and wrk (installed from Debian's package if missing) on 127.0.0.1 for
# about 25 minutes and rewrites docs/benchmarks.md. BENCH_QUICK=1 makes it a three-minute smoke run.
bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache wabot.db*
