"""Hippocampus inference time per volume before and after the fast CPU path, and its held-out Dice.

*Before* is the network as it ran up to model version 1.0.0's first release: torch's own
``InstanceNorm3d``, the default (channels-first) layout, and the image and its left-right mirror
as two separate passes. *After* is the shipped path (``HippocampusSegmenter.segment``): instance
norm computed as a group norm, channels-last on CPU, both mirror passes in one batch. Both use
the same weights on the demo HippoCrop series brought into model space; they are timed
alternately in one run (round by round, so that load from other processes hits both alike) and
the ratio is taken per round. The whole analysis (reorientation, network, mapping back,
volumes) is timed after them, and the held-out Dice of the shipped weights is measured with
both paths on the model card's split. Not part of the test suite. From the repository root:

    .venv/bin/python -m benchmarks.inference_time [--runs 30] [--device cpu|cuda:0] [--no-dice]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.hippocampus.analysis import DEFAULT_WEIGHTS, HippocampusAnalysis  # noqa: E402
from inference.hippocampus.model import InstanceNorm3d, UNet3d  # noqa: E402
from inference.hippocampus.predict import (  # noqa: E402
    HippocampusSegmenter,
    checked,
    dice_per_class,
    load_case,
    normalise,
    summarise_dice,
)
from inference.volume import load_series, to_model_space  # noqa: E402

CROP = REPO / "deploy" / "demo-data" / "Study1-HippoCrop"
DATA_DIR = REPO.parent / "shared" / "data" / "hippocampus-msd"


def reference_network(segmenter: HippocampusSegmenter, device: str) -> UNet3d:
    """The shipped weights in a network with torch's own InstanceNorm3d, default layout."""
    model = UNet3d(**segmenter.meta["architecture"])
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, InstanceNorm3d):
                setattr(module, name, nn.InstanceNorm3d(child.num_features, affine=True))
    state = {k: v.to("cpu", torch.float32) for k, v in segmenter.model.state_dict().items()}
    model.load_state_dict(state)
    return model.to(device).eval()


def reference_segment(model: UNet3d, image_ras: np.ndarray, device: str) -> np.ndarray:
    """Label a crop the way the node did before: two passes, softmax averaged."""
    x = torch.from_numpy(normalise(checked(image_ras)))[None, None].to(device)
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)
        probs = (probs + torch.softmax(model(x.flip(2)), dim=1).flip(2)) / 2
    return probs[0].argmax(dim=0).to("cpu", torch.uint8).numpy()


def timed_once(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def held_out_dice(segment: Callable[[np.ndarray], np.ndarray], cases: list[str]) -> dict[str, float]:
    per_case = {}
    for case_id in cases:
        image, label = load_case(DATA_DIR, case_id)
        per_case[case_id] = dice_per_class(segment(image), label)
    summary = summarise_dice(per_case)
    return {k: summary[k] for k in ("anterior", "posterior", "mean", "n_cases")}


def ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:.1f} ms (min {min(values) * 1000:.1f},"
            f" max {max(values) * 1000:.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    parser.add_argument("--no-dice", action="store_true", help="skip the held-out Dice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    volume = load_series([pydicom.dcmread(p) for p in sorted(CROP.glob("*.dcm"))])
    analysis = HippocampusAnalysis()
    analysis.load(device)
    image, _ = to_model_space(volume, ("R", "A", "S"), (1.0, 1.0, 1.0))
    segmenter = HippocampusSegmenter(DEFAULT_WEIGHTS[0], device)
    before_model = reference_network(segmenter, device)

    def before() -> np.ndarray:
        return reference_segment(before_model, image, device)

    def after() -> np.ndarray:
        return segmenter.segment(image)

    same = float(np.mean(before() == after()))
    for _ in range(3):  # warm-up
        before()
        after()
    times_before: list[float] = []
    times_after: list[float] = []
    for round_ in range(args.runs):
        pair = [(before, times_before), (after, times_after)]
        for function, times in pair if round_ % 2 == 0 else pair[::-1]:
            times.append(timed_once(function))
    ratios = [b / a for b, a in zip(times_before, times_after, strict=True)]
    whole = [timed_once(lambda: analysis.run(volume)) for _ in range(args.runs)]
    load = os.getloadavg()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s),"
          f" volume {volume.shape} -> model space {image.shape}; load average {load[0]:.2f}"
          f" {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    print(f"labels identical before/after: {same * 100:.4f} % of voxels")
    print(f"before (InstanceNorm3d, channels-first, 2 passes): {ms(times_before)} over {args.runs} runs")
    print(f"after  (group norm, channels-last, 1 batch of 2):  {ms(times_after)} over {args.runs} runs")
    print(f"speed-up before/after per round: median {statistics.median(ratios):.2f}x"
          f" (min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"whole analysis (reorient, network, map back, volumes), after: {ms(whole)};"
          f" network share {statistics.median(times_after) / statistics.median(whole):.2f}")
    if not args.no_dice:
        cases = list(segmenter.meta["split"])
        recorded = segmenter.meta["held_out_dice"]
        for name, segment in (("before", lambda im: reference_segment(before_model, im, device)),
                              ("after", segmenter.segment)):
            dice = held_out_dice(segment, cases)
            print(f"held-out Dice {name}: anterior {dice['anterior']:.4f}, posterior"
                  f" {dice['posterior']:.4f}, mean {dice['mean']:.4f} over {dice['n_cases']} cases"
                  f" (recorded in the weights: mean {recorded['mean']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
