"""The body-composition model configuration: the shipped default, plot colours, refused Keras weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from inference.bodycomp.config import DEFAULT_CONFIG, ModelConfigError, check_weights_format, load_model_config
from inference.bodycomp.segmentation import load_segmenter
from offline.bodycomp.commands import _train_device


def write_keras_weights(path: Path) -> Path:
    """An HDF5 file laid out as Keras saves weights (``model_weights/<layer>/<layer>/kernel:0``)."""
    with h5py.File(path, "w") as handle:
        handle.attrs["keras_version"] = "2.4.0"
        handle.create_dataset("model_weights/conv2d/conv2d/kernel:0", data=np.zeros((3, 3, 1, 8), np.float32))
    return path


def test_the_shipped_configuration_loads_and_is_the_classical_l3_path() -> None:
    config = load_model_config(DEFAULT_CONFIG)
    assert config.levels == ("L3",) and not config.uses_deep_learning
    assert config.slice_params["L3"].class_names == ("muscle", "subcutaneous_fat", "visceral_fat")


def test_regression_plot_colour_is_validated_when_loading(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"slice_params": {"L3": {"regression_plot_colour": "#00aa00"},
                                                 "T10": {"regression_plot_colour": "bleu"}}}))
    with pytest.raises(ModelConfigError) as raised:
        load_model_config(path)
    assert str(raised.value) == (
        "config.json: slice_params.T10.regression_plot_colour: Value error, 'bleu' is not a Matplotlib colour "
        "(a name such as 'red', or '#rrggbb')")


@pytest.mark.parametrize("name", ["l3_seg.hdf5", "renamed.pt"])
def test_keras_weights_are_refused_saying_what_is_supported(tmp_path: Path, name: str) -> None:
    weights = write_keras_weights(tmp_path / name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"slice_params": {"L3": {"model_weights": name}}}))
    with pytest.raises(ModelConfigError) as raised:
        load_model_config(path)
    message = str(raised.value)
    assert message.startswith(f"config.json: slice_params.L3.model_weights: {weights} is a Keras/HDF5 weights file")
    assert "PyTorch checkpoints (.pt)" in message and "dicom-node train body-segmentation" in message
    with pytest.raises(ValueError, match="is a Keras/HDF5 weights file"):  # and the loader, before torch.load
        load_segmenter(weights, "cpu")


def test_a_torch_checkpoint_passes_the_format_check(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"kind": "x"}, path)
    check_weights_format(path)


def test_gpus_without_a_gpu_say_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    device = _train_device(1)
    if torch.cuda.is_available():
        assert device == "cuda:0"
    else:
        assert device == "cpu"
        assert "-g/--gpus 1: no CUDA GPU is available here; training on the CPU" in caplog.text
    assert _train_device(0) == "cpu"
