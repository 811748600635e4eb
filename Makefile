# Developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# Test selection, e.g. `make test TESTS=test/test_packaging.py`.
TESTS ?= test

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/actdistill demo

test: setup
	source scripts/ros_env.sh && ACTDISTILL_REQUIRE_ROS=1 $(PY) -m pytest -q $(TESTS)

bench: setup
	$(VENV)/bin/actdistill bench --json

# Build outputs only; the venv stays (rm -rf .venv to start over).
clean:
	rm -rf build/ros .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
