# dicom-node: `make demo` runs the node end to end, `make test` runs the whole test suite,
# `make bench` runs every benchmark quickly (options: make bench BENCH_ARGS="--full").
.PHONY: setup setup-test demo test bench lint

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

demo: setup
	.venv/bin/python -m deploy.local.demo

# Two test processes (pytest-xdist), each running whole test files: most integration tests wait on
# the servers they start, so two files at a time take about half the time on two cores. The tests
# marked `timing` compare durations or CPU shares, so they run afterwards, alone.
test: setup-test
	.venv/bin/python -m pytest -n 2 --dist loadfile -m "not timing"; parallel=$$?; \
	.venv/bin/python -m pytest -m timing; alone=$$?; \
	[ $$parallel -eq 0 ] && [ $$alone -eq 0 ]

lint: setup-test
	.venv/bin/python -m mypy

bench: setup-test
	.venv/bin/python benchmarks/run_all.py $(BENCH_ARGS)
