"""Hippocampus inference time per volume, on CPU (and on CUDA where present).

Times the network on the demo HippoCrop series brought into model space, and the whole analysis
(reorientation, network, mapping back, volumes) around it, in the same run. Not part of the test
suite. From the repository root:

    .venv/bin/python -m benchmarks.inference_time [--runs 20] [--device cpu|cuda:0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pydicom
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.hippocampus.analysis import HippocampusAnalysis  # noqa: E402
from inference.volume import load_series, to_model_space  # noqa: E402

CROP = REPO / "deploy" / "demo-data" / "Study1-HippoCrop"


def timed(function: object, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()  # type: ignore[operator]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    volume = load_series([pydicom.dcmread(p) for p in sorted(CROP.glob("*.dcm"))])
    analysis = HippocampusAnalysis()
    analysis.load(args.device)
    image, _ = to_model_space(volume, ("R", "A", "S"), (1.0, 1.0, 1.0))
    segmenter = analysis._segmenter
    assert segmenter is not None
    timed(lambda: segmenter.segment(image), 3)  # warm-up
    network = timed(lambda: segmenter.segment(image), args.runs)
    whole = timed(lambda: analysis.run(volume), args.runs)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s),"
          f" volume {volume.shape} -> model space {image.shape}")
    print(f"network (with mirror test-time augmentation): median {statistics.median(network) * 1000:.1f} ms"
          f" (min {min(network) * 1000:.1f}, max {max(network) * 1000:.1f}) over {args.runs} runs")
    print(f"whole analysis (reorient, network, map back, volumes): median {statistics.median(whole) * 1000:.1f} ms;"
          f" network share {statistics.median(network) / statistics.median(whole):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
