"""Tests for the hippocampus U-Net, its training command and the shipped weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.hippocampus.model import DEFAULT_ARCHITECTURE, UNet3d
from inference.hippocampus.predict import (
    HippocampusSegmenter,
    class_labels,
    dice_per_class,
    evaluate,
    list_cases,
    load_case,
    normalise,
    predict_passes,
)
from inference.hippocampus.train import split_cases, train

DATA_DIR = Path(__file__).parents[3] / "shared" / "data" / "hippocampus-msd"
REPO = Path(__file__).parents[2]
WEIGHTS = REPO / "inference" / "hippocampus" / "weights" / "hippocampus_unet3d.pt"

needs_data = pytest.mark.usefixtures("shared_data")  # fails, never skips, without ../shared


@pytest.fixture
def untrained_weights(tmp_path: Path) -> Path:
    """A weights file holding a freshly initialised network and minimal metadata."""
    torch.manual_seed(0)
    model = UNet3d(**DEFAULT_ARCHITECTURE)
    path = tmp_path / "untrained.pt"
    meta = {
        "model_name": "hippocampus-unet3d",
        "version": "0.0.0",
        "architecture": dict(DEFAULT_ARCHITECTURE),
    }
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path


@pytest.mark.parametrize("shape", [(31, 45, 27), (8, 16, 8), (17, 9, 43)])
def test_forward_keeps_odd_spatial_sizes(shape: tuple[int, int, int]) -> None:
    model = UNet3d(**DEFAULT_ARCHITECTURE).eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, 1, *shape))
    assert logits.shape == (2, 3, *shape)


def test_forward_rejects_no_levels() -> None:
    with pytest.raises(ValueError, match="levels"):
        UNet3d(levels=0)


def test_segment_returns_uint8_labels_of_input_shape(untrained_weights: Path) -> None:
    segmenter = HippocampusSegmenter(untrained_weights, "cpu")
    image = np.random.default_rng(0).normal(100.0, 20.0, size=(35, 51, 33))
    labels = segmenter.segment(image)
    assert labels.shape == image.shape
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert segmenter.meta["model_name"] == "hippocampus-unet3d"


def test_class_labels_match_torch_argmax_and_take_the_first_class_on_a_tie() -> None:
    probs = torch.softmax(torch.from_numpy(np.random.default_rng(1).normal(size=(3, 7, 6, 5))).float(), dim=0)
    probs[:, 0, 0, 0] = torch.tensor([0.25, 0.5, 0.5])  # a tie between classes 1 and 2
    probs[:, 0, 0, 1] = torch.tensor([0.5, 0.5, 0.0])  # a tie between classes 0 and 1
    view = probs.permute(0, 3, 1, 2)  # not contiguous
    for tensor in (probs, view):
        labels = class_labels(tensor)
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, tensor.argmax(dim=0).to(torch.uint8).numpy())
    assert class_labels(probs)[0, 0, 0] == 1 and class_labels(probs)[0, 0, 1] == 0


def test_segment_rejects_non_3d_input(untrained_weights: Path) -> None:
    segmenter = HippocampusSegmenter(untrained_weights, "cpu")
    with pytest.raises(ValueError, match="3D"):
        segmenter.segment(np.zeros((4, 4)))


def test_dice_per_class_counts_each_label() -> None:
    truth = np.zeros((4, 4, 4), dtype=np.uint8)
    truth[:2] = 1
    prediction = truth.copy()
    prediction[0] = 0
    scores = dice_per_class(prediction, truth)
    assert scores["anterior"] == pytest.approx(2 * 16 / (16 + 32))
    assert scores["posterior"] == 1.0


@needs_data
def test_split_is_deterministic_and_disjoint() -> None:
    split = split_cases(list_cases(DATA_DIR))
    assert split == split_cases(list(reversed(list_cases(DATA_DIR))))
    assert len(split["test"]) == 46
    everything = split["train"] + split["validation"] + split["test"]
    assert len(everything) == len(set(everything)) == 230


@needs_data
def test_one_epoch_on_four_cases_writes_loadable_weights(tmp_path: Path) -> None:
    out_path = tmp_path / "weights" / "hippo.pt"
    lines: list[str] = []
    result = train(DATA_DIR, out_path, epochs=1, seed=3, progress=lines.append, max_cases=4)
    assert [path.name for path in out_path.parent.iterdir()] == ["hippo.pt"]
    assert any(line.startswith("epoch 1/1") and "val dice anterior" in line for line in lines)
    meta = HippocampusSegmenter(out_path, "cpu").meta
    assert meta == result["meta"]
    assert meta["model_name"] == "hippocampus-unet3d"
    assert meta["axcodes"] == ("R", "A", "S")
    assert meta["spacing_mm"] == (1.0, 1.0, 1.0)
    assert meta["label_names"] == {1: "anterior", 2: "posterior"}
    assert meta["seed"] == 3 and meta["epochs"] == 1
    assert len(meta["split"]) == 4
    assert set(meta["held_out_dice"]) == {"anterior", "posterior", "mean", "n_cases"}
    for key in ("version", "normalisation", "architecture"):
        assert meta[key]


@needs_data
def test_shipped_weights_reach_recorded_dice() -> None:
    assert WEIGHTS.stat().st_size < 5_000_000
    segmenter = HippocampusSegmenter(WEIGHTS, "cpu")
    recorded = segmenter.meta["held_out_dice"]
    assert recorded["n_cases"] == 46
    held_out = segmenter.meta["split"]
    assert not set(held_out) & set(split_cases(list_cases(DATA_DIR))["train"])
    scores = evaluate(segmenter, DATA_DIR, held_out[:5])
    assert scores["anterior"] > 0.8
    assert scores["posterior"] > 0.8
    assert scores["mean"] == pytest.approx(recorded["mean"], abs=0.05)


@needs_data
def test_shipped_weights_respect_the_anterior_posterior_axis() -> None:
    segmenter = HippocampusSegmenter(WEIGHTS, "cpu")
    image, _ = load_case(DATA_DIR, segmenter.meta["split"][0])
    labels = segmenter.segment(image)
    anterior_y = np.nonzero(labels == 1)[1].mean()
    posterior_y = np.nonzero(labels == 2)[1].mean()
    assert anterior_y > posterior_y


@needs_data
def test_fast_path_matches_torch_instance_norm_and_two_passes() -> None:
    """Group-norm instance norm, channels-last and one mirrored batch change nothing."""
    segmenter = HippocampusSegmenter(WEIGHTS, "cpu")
    reference = UNet3d(**segmenter.meta["architecture"])
    for module in list(reference.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.InstanceNorm3d):
                setattr(module, name, torch.nn.InstanceNorm3d(child.num_features, affine=True))
    reference.load_state_dict(segmenter.model.state_dict())
    reference.eval()
    image, _ = load_case(DATA_DIR, segmenter.meta["split"][1])
    image_norm = normalise(image)
    x = torch.from_numpy(image_norm)[None, None]
    with torch.inference_mode():
        expected = torch.softmax(reference(x), dim=1)[0]
        expected_mirror = torch.softmax(reference(x.flip(2)), dim=1)[0].flip(1)
    passes = predict_passes(segmenter.model, image_norm, "cpu", mirror=True)
    assert passes.shape == (2, 3, *image.shape)
    assert torch.allclose(passes[0], expected, atol=1e-4)
    assert torch.allclose(passes[1], expected_mirror, atol=1e-4)
    labels = segmenter.segment(image)
    assert np.array_equal(labels, ((expected + expected_mirror) / 2).argmax(dim=0).numpy())
