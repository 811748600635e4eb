# Developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# Test selection, e.g. `make test TESTS=test/test_packaging.py`.
TESTS ?= test

.PHONY: setup demo test test-fast bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/actdistill demo

# Missing ROS 2 parts or a missing simulator fail the run instead of skipping tests.
test: setup
	source scripts/ros_env.sh && ACTDISTILL_REQUIRE_ROS=1 ACTDISTILL_REQUIRE_SIM=1 $(PY) -m pytest -q $(TESTS)

# The suite without the tests that start ROS 2 node processes, drive the simulator or train in
# several processes (markers set in test/conftest.py), for the edit-test loop; `make test` runs everything.
test-fast: setup
	source scripts/ros_env.sh && ACTDISTILL_REQUIRE_ROS=1 \
	    $(PY) -m pytest -q -m "not slow_ros and not sim and not multiprocess" $(TESTS)

bench: setup
	$(VENV)/bin/actdistill bench --json

# Build outputs only; the venv stays (rm -rf .venv to start over).
clean:
	rm -rf build/ros .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
