"""Run every benchmark in turn, each in its own process, with quick settings unless told otherwise.

Each benchmark starts with few runs and small inputs, so the whole set finishes in minutes;
``--full`` uses each benchmark's own defaults instead. Options for one benchmark follow
``--with NAME=OPTIONS`` and override the quick settings. Not part of the test suite. From the
repository root:

    .venv/bin/python benchmarks/run_all.py [NAME ...] [--full] [--with inference_time="--device cuda:0"]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Every benchmark module, in the order they run, with the options of a quick run.
QUICK: dict[str, tuple[str, ...]] = {
    "inference_time": ("--runs", "3"),
    "bodycomp_time": ("--runs", "1"),
    "bodycomp_first_job": ("--runs", "1"),
    "receive_throughput": ("--repeats", "1", "--ct-slices", "60", "--mr-copies", "1"),
    "end_to_end_latency": ("--runs", "3"),
}


def parse_options(text: str) -> tuple[str, list[str]]:
    """Split ``NAME=OPTIONS`` into the benchmark name and its options.

    Parameters
    ----------
    text
        A benchmark name, ``=``, and its command-line options as a shell would split them.

    Returns
    -------
    tuple[str, list[str]]
        The name and the options.

    Raises
    ------
    argparse.ArgumentTypeError
        If the name is not a benchmark.
    """
    name, _, options = text.partition("=")
    if name not in QUICK:
        raise argparse.ArgumentTypeError(f"unknown benchmark {name!r} (known: {', '.join(QUICK)})")
    return name, shlex.split(options)


def main() -> int:
    """Run the chosen benchmarks; return 1 if any failed, else 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(QUICK)})")
    parser.add_argument("--full", action="store_true", help="each benchmark's own defaults, not quick settings")
    parser.add_argument("--with", dest="extra", action="append", default=[], type=parse_options,
                        metavar="NAME=OPTIONS", help="options for one benchmark, e.g. inference_time='--runs 20'")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in QUICK]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(QUICK)})")
    extra: dict[str, list[str]] = {}
    for name, options in args.extra:
        extra.setdefault(name, []).extend(options)
    failed = []
    for name in args.names or list(QUICK):
        # argparse keeps the last value of an option given twice, so given options win.
        command = [sys.executable, "-m", f"benchmarks.{name}",
                   *(() if args.full else QUICK[name]), *extra.get(name, [])]
        print(f"== {name}: {shlex.join(command[1:])}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, check=False)
        print(f"== {name}: exit status {result.returncode} after {time.perf_counter() - start:.1f} s\n", flush=True)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
