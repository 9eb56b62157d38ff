# dicom-node: `make demo` runs the node end to end, `make test` runs the whole test suite,
# `make bench` runs every benchmark quickly (options: make bench BENCH_ARGS="--full").
.PHONY: setup setup-test demo test bench lint

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

demo: setup
	.venv/bin/python -m deploy.local.demo

test: setup-test
	.venv/bin/python -m pytest

lint: setup-test
	.venv/bin/python -m mypy

bench: setup-test
	.venv/bin/python benchmarks/run_all.py $(BENCH_ARGS)
