# The two commands a user needs: `make demo` and `make test`. Both create .venv from the lock file when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipcraft-installed

.PHONY: demo test lint format venv lock clean benchmarks-md

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipcraft demo

test: $(STAMP)
	@bash scripts/ensure-browser
	$(VENV)/bin/ruff check src tests $(wildcard bench)
	$(VENV)/bin/ruff format --check src tests $(wildcard bench)
	$(PY) -m pytest -q
	$(PY) -m pytest -q bench/tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests $(wildcard bench)
	$(VENV)/bin/ruff format src tests $(wildcard bench)

# Re-pin every dependency after changing pyproject.toml (run inside a working .venv).
lock: $(STAMP)
	$(PY) -m pip freeze --all --exclude-editable --exclude clipcraft --exclude pip | LC_ALL=C sort > requirements.lock

# BENCHMARKS.md is bench/HEADER.md followed by the sections the benchmark write-ups keep in bench/sections/.
BENCH_SECTIONS := train levers levers-native-bf16 eval search server scale finetune adapt export precision
benchmarks-md:
	cat bench/HEADER.md $(foreach s,$(BENCH_SECTIONS),$(wildcard bench/sections/$(s).md)) > BENCHMARKS.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info
