"""The deep-learning path of body composition: configuration forms, level location, networks on the real CT."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.errors import InputError
from inference.bodycomp.analysis import MIXED_METHOD, BodyCompositionAnalysis
from inference.bodycomp.config import BodyCompModelConfig, ModelConfigError, load_model_config
from inference.bodycomp.segmentation import UNet2D, load_segmenter, mask_to_target, segment_slices
from inference.bodycomp.segmentation import save_checkpoint as save_segmentation
from inference.bodycomp.slice_selection import SliceSelectionNet, crossing, locate_levels
from inference.bodycomp.slice_selection import save_checkpoint as save_selection
from inference.volume import Volume, load_series
from tests.conftest import SHARED_DATA
from tests.factories import series_from_nifti

CT = SHARED_DATA / "ct-abdomen"
ISSUE_JSON = {
    "sigmoid_output": True, "slice_selection_weights": "ss.pt",
    "slice_params": {"L3": {"slice_selection_model_output_index": 0, "z_pos": 0.0,
                            "class_names": ["muscle", "subcutaneous_fat", "visceral_fat"],
                            "model_weights": "seg.pt", "regression_plot_colour": "red"}},
}
NODE_TOML = """
[analyses.body-composition]
plugin = "body-composition"
[analyses.body-composition.options.model]
sigmoid_output = true
slice_selection_weights = "ss.pt"
[analyses.body-composition.options.model.slice_params.L3]
slice_selection_model_output_index = 0
z_pos = 0.0
class_names = ["muscle", "subcutaneous_fat", "visceral_fat"]
model_weights = "seg.pt"
regression_plot_colour = "red"
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_segmentation(folder / "seg.pt", UNet2D(4, base=4), class_names=["muscle", "subcutaneous_fat",
                      "visceral_fat"], input_px=32, base=4)
    save_selection(folder / "ss.pt", SliceSelectionNet(1), sigmoid_output=True, levels=["L3"], input_px=32)
    return folder


@pytest.fixture(scope="module")
def ct_volume() -> Volume:
    return load_series(series_from_nifti(CT / "example_ct.nii.gz", modality="CT"))


def test_json_and_toml_forms_are_the_same_configuration(weights: Path, tmp_path: Path) -> None:
    (weights / "model.json").write_text(json.dumps(ISSUE_JSON))
    (weights / "model.toml").write_text(NODE_TOML.split("[analyses.body-composition.options.model]\n", 1)[1]
                                        .replace("[analyses.body-composition.options.model.", "["))
    from_json, from_toml = load_model_config(weights / "model.json"), load_model_config(weights / "model.toml")
    assert from_json == from_toml and from_json.uses_deep_learning
    assert from_json.slice_params["L3"].model_weights == str(weights / "seg.pt")  # relative to the file
    options = tomllib.loads(NODE_TOML)["analyses"]["body-composition"]["options"]
    model = options["model"]
    model["slice_selection_weights"] = str(weights / "ss.pt")
    model["slice_params"]["L3"]["model_weights"] = str(weights / "seg.pt")
    analysis = BodyCompositionAnalysis(**options)  # what the node's plugin loader does
    assert analysis.model_name == "bodycomp-dl" and analysis.model_version.startswith("0.1.0+")
    with pytest.raises(ModelConfigError, match=r"slice_params\.L3\.z_pos"):
        BodyCompositionAnalysis(model={"slice_params": {"L3": {"z_pos": "high"}}})
    (tmp_path / "x.json").write_text(json.dumps({"slice_selection_weights": "missing.pt"}))
    with pytest.raises(ModelConfigError, match="missing.pt does not exist"):
        load_model_config(tmp_path / "x.json")


def test_levels_are_where_the_outputs_cross() -> None:
    z = np.arange(40, dtype=np.float64)
    noisy = (z > 25.4).astype(np.float64) * 0.9 + 0.05
    noisy[8:10] = 0.7  # a spurious blip below the level
    assert crossing(noisy, 0.5) == pytest.approx(25.5, abs=0.5)
    assert crossing(np.zeros(40), 0.5) is None
    sigmoid = BodyCompModelConfig.model_validate({"slice_params": {
        "L3": {"slice_selection_model_output_index": 1}, "L1": {"slice_selection_model_output_index": 0}}})
    outputs = np.stack([(z > 30).astype(float), (z > 10).astype(float)], axis=1)
    found = locate_levels(outputs, sigmoid)
    assert found["L3"] == pytest.approx(10.5, abs=0.5) and found["L1"] == pytest.approx(30.5, abs=0.5)
    regression = BodyCompModelConfig.model_validate({"sigmoid_output": False, "slice_params": {
        "L3": {"z_pos": 0.0}, "L1": {"z_pos": 0.6}}})
    offsets = ((z - 12.0) * 3.0 / 100.0)[:, None]  # 3 mm slices, L3 at slice 12
    found = locate_levels(offsets, regression)
    assert found["L3"] == pytest.approx(12.0, abs=0.1) and found["L1"] == pytest.approx(32.0, abs=0.1)


def test_segmenter_labels_keep_the_source_grid(weights: Path, ct_volume: Volume) -> None:
    segmenter = load_segmenter(weights / "seg.pt", "cpu")
    labels = segment_slices(segmenter, ct_volume.array[50:52])
    assert labels.shape == (2, *ct_volume.shape[1:]) and set(np.unique(labels)) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="configured class_names"):
        load_segmenter(weights / "seg.pt", "cpu", ["muscle", "subcutaneous_fat"])
    with pytest.raises(ValueError, match="not a bodycomp-segmentation checkpoint"):
        load_segmenter(weights / "ss.pt", "cpu")
    thoracic = mask_to_target(np.array([0, 1, 2, 3]), ["muscle", "subcutaneous_fat"])
    assert thoracic.tolist() == [0, 1, 2, 0]


def test_mixed_path_classical_levels_with_network_segmentation(weights: Path, ct_volume: Volume) -> None:
    analysis = BodyCompositionAnalysis(model={"slice_params": {"L3": {"model_weights": str(weights / "seg.pt")}}})
    analysis.load("cpu")
    result = analysis.run(ct_volume)
    level = result.summary["levels"]["L3"]
    assert result.summary["path"] == MIXED_METHOD and result.model_name == "bodycomp-dl"
    assert level["segmentation"] == "deep learning" and abs(level["z_mm"] - 314.8) <= 6.0
    assert result.summary["level_anchor"] == "pelvis"
    assert "segmentation: deep learning" in result.method


def test_network_that_never_crosses_fails_clearly(weights: Path, ct_volume: Volume) -> None:
    net = SliceSelectionNet(1)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.constant_(net.head.bias, -5.0)  # every slice "below L3"
    save_selection(weights / "flat.pt", net, sigmoid_output=True, levels=["L3"], input_px=32)
    analysis = BodyCompositionAnalysis(model={"slice_selection_weights": str(weights / "flat.pt")})
    analysis.load("cpu")
    with pytest.raises(InputError, match="L3 not found.*slice-selection network"):
        analysis.run(ct_volume)
