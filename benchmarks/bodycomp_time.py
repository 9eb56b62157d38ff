"""Body-composition time per study on the 112-slice abdomen CT, stage by stage, classical and deep-learning paths.

Writes the real CT (../shared/data/ct-abdomen/example_ct.nii.gz, 122 x 101 x 112 at 3 mm) as a
DICOM series, then times: load (read the files, build the volume), level finding (classical
spine finder; slice-selection CNN), segmentation of the L3 slice (classical HU thresholds and
wall; 2D U-Net), measurement, and reports (run-csv: preview PNG, slice-selection plot, JSON;
node: SEG + SC + SR). Network timings use randomly initialised networks of the shipped
architecture (timing does not depend on the weights) unless weights are given. Not part of the
test suite. From the repository root:

    .venv/bin/python -m benchmarks.bodycomp_time [--runs 3] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from dicom_node.run.pipeline import LoadedSeries, identity_for, load_sources, report_results  # noqa: E402
from inference.bodycomp import classical  # noqa: E402
from inference.bodycomp.analysis import AXIAL_AXCODES, BodyCompositionAnalysis, measure  # noqa: E402
from inference.bodycomp.plots import plot_slice_selection  # noqa: E402
from inference.bodycomp.segmentation import UNet2D, load_segmenter, segment_slices  # noqa: E402
from inference.bodycomp.segmentation import save_checkpoint as save_segmentation  # noqa: E402
from inference.bodycomp.slice_selection import SliceSelectionNet, load_slice_selector, predict_outputs  # noqa: E402
from inference.bodycomp.slice_selection import save_checkpoint as save_selection  # noqa: E402
from inference.volume import to_model_space  # noqa: E402
from offline.bodycomp.csv_runner import result_settings  # noqa: E402
from reports.preview import render_report_png  # noqa: E402
from tests.factories import series_from_nifti, write_datasets  # noqa: E402

CT = REPO.parent / "shared" / "data" / "ct-abdomen" / "example_ct.nii.gz"


def median_s(function: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seg-input-px", type=int, default=256, help="U-Net working size (trainer default 256)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bodycomp-bench-"))
    paths = write_datasets(series_from_nifti(CT, modality="CT", series_description="Abdomen 3mm"), work / "ct")
    torch.manual_seed(0)
    save_segmentation(work / "seg.pt", UNet2D(4, 16), class_names=["muscle", "subcutaneous_fat", "visceral_fat"],
                      input_px=args.seg_input_px, base=16)
    save_selection(work / "ss.pt", SliceSelectionNet(1), sigmoid_output=True, levels=["L3"], input_px=128)
    selector = load_slice_selector(work / "ss.pt", args.device)
    segmenter = load_segmenter(work / "seg.pt", args.device)

    def load() -> LoadedSeries:
        return load_sources(paths)

    stages: dict[str, float] = {}
    stages["load (read 112 files, build volume)"] = median_s(load, args.runs)
    loaded = load()
    volume = loaded.volume
    stack, space = to_model_space(volume, AXIAL_AXCODES)
    stages["reorient to axial stack"] = median_s(lambda: to_model_space(volume, AXIAL_AXCODES), args.runs)
    _, sy, sx = space.spacing_mm
    track = classical.find_levels(stack, space.spacing_mm)
    k = int(round(track.levels["L3"]))
    stages["level finding, classical (spine)"] = median_s(lambda: classical.find_levels(stack, space.spacing_mm), args.runs)
    stages["level finding, CNN (112 slices)"] = median_s(lambda: predict_outputs(selector, stack), args.runs)
    labels = classical.segment_slice(stack[k], (sy, sx))
    stages["segmentation, classical (1 slice)"] = median_s(lambda: classical.segment_slice(stack[k], (sy, sx)), args.runs)
    stages[f"segmentation, U-Net {args.seg_input_px} px (1 slice)"] = median_s(
        lambda: segment_slices(segmenter, stack[k : k + 1]), args.runs)
    stages["measurement (3 compartments)"] = median_s(
        lambda: [measure(stack[k : k + 1], labels[None], (sy, sx), c) for c in (1, 2, 3)], args.runs)
    analysis = BodyCompositionAnalysis()
    analysis.load(args.device)
    result = analysis.run(volume)
    stages["whole analysis, classical (run)"] = median_s(lambda: analysis.run(volume), args.runs)
    sources = loaded.sources
    settings = result_settings(analysis.name)
    identity = identity_for(result, settings.node_name)

    def csv_reports() -> None:
        png = render_report_png(sources, result.label_map, result.structures, result.measurements,
                                key_slices=result.key_slices, title=result.title, model_name=result.model_name,
                                model_version=result.model_version, method=result.method, identity=identity)
        Image.fromarray(png).save(work / "preview.png")
        plot_slice_selection(result.summary, work / "plot.png")
        (work / "result.json").write_text(json.dumps(result.summary))

    study_uid = str(sources[0].StudyInstanceUID)
    stages["reports, run-csv (preview, plot, JSON)"] = median_s(csv_reports, args.runs)
    stages["reports, node (SEG + SC + SR)"] = median_s(
        lambda: report_results(result, sources, study_uid=study_uid, series_uid=volume.series_instance_uid,
                               analysis=analysis.name, series_numbers=settings.series_numbers,
                               node_name=settings.node_name), args.runs)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
          f"volume {volume.shape}, median of {args.runs} run(s)")
    width = max(map(len, stages))
    for name, seconds in stages.items():
        print(f"  {name:<{width}}  {seconds * 1000:8.1f} ms")
    classical_total = sum(v for n, v in stages.items() if n.startswith(("load", "whole", "reports, run-csv")))
    print(f"  {'run-csv study, classical (load + analysis + reports)':<{width}}  {classical_total * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
