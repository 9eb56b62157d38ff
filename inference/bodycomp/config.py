"""The body-composition model configuration: levels, class names and weights, from JSON, TOML or plugin options."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.colors import is_color_like
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

#: Compartments with their own codes, in label order (label = position + 1). A trained model may
#: output further compartments (``class_names`` beyond these), reported with generic codes.
KNOWN_CLASSES = ("muscle", "subcutaneous_fat", "visceral_fat")
#: What a class name may look like (it names measurements, CSV columns and SEG segments).
CLASS_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
DEFAULT_CLASSES = KNOWN_CLASSES
THORACIC_CLASSES = ("muscle", "subcutaneous_fat")
#: The configuration shipped with the package (classical path, L3), used when none is given.
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.json"
#: Suffixes of Keras weight files (the original pipeline's), and the HDF5 file signature.
KERAS_SUFFIXES = frozenset({".hdf5", ".h5", ".keras"})
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class ModelConfigError(ValueError):
    """A model configuration is invalid; the message names the key (``slice_params.L3.z_pos: ...``)."""


class TrainingDataError(ValueError):
    """A training set or its sources do not follow the documented layout; the message says what is wrong."""


class LevelParams(BaseModel):
    """What is measured at one vertebral level and with which segmentation model.

    Parameters
    ----------
    slice_selection_model_output_index
        Output of the slice-selection network for this level (sigmoid mode).
    z_pos
        Target of the regression output at this level (regression mode), in the units the
        network was trained in (mm offset from the reference level divided by
        :data:`inference.bodycomp.slice_selection.Z_SCALE_MM`).
    class_names
        Compartments the segmentation model outputs, in channel order after background.
    model_weights
        Segmentation weights (``.pt``); ``None`` segments this level on the classical path.
    regression_plot_colour
        Matplotlib colour of this level in the slice-selection plots.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    slice_selection_model_output_index: int = Field(default=0, ge=0)
    z_pos: float = 0.0
    # model_weights before class_names: the class_names check reads it
    model_weights: str | None = None
    class_names: tuple[str, ...] = DEFAULT_CLASSES
    regression_plot_colour: str = "red"

    @field_validator("class_names")
    @classmethod
    def _class_names(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        malformed = [name for name in value if not CLASS_NAME.match(name)]
        if malformed or not value or len(set(value)) != len(value):
            raise ValueError(
                f"must be distinct snake_case names ({', '.join(KNOWN_CLASSES)} or others a trained model "
                f"outputs), not {list(value)}"
            )
        extra = [name for name in value if name not in KNOWN_CLASSES]
        if extra and info.data.get("model_weights") is None:
            raise ValueError(
                f"{extra}: only a trained model (model_weights) segments compartments beyond "
                f"{', '.join(KNOWN_CLASSES)}; the classical path segments those three"
            )
        return value

    @field_validator("regression_plot_colour")
    @classmethod
    def _colour(cls, value: str) -> str:
        if not is_color_like(value):
            raise ValueError(f"{value!r} is not a Matplotlib colour (a name such as 'red', or '#rrggbb')")
        return value


class BodyCompModelConfig(BaseModel):
    """The whole model configuration (the JSON form of the issue, or the same keys in TOML).

    ``slice_selection_weights`` ``None`` finds levels on the classical path; a level without
    ``model_weights`` is segmented on the classical path. Relative weight paths are resolved
    against the configuration file's folder by :func:`load_model_config`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sigmoid_output: bool = True
    slice_selection_weights: str | None = None
    slice_params: dict[str, LevelParams] = Field(default_factory=lambda: {"L3": LevelParams()})

    @field_validator("slice_params")
    @classmethod
    def _some_levels(cls, value: dict[str, LevelParams]) -> dict[str, LevelParams]:
        if not value:
            raise ValueError("at least one level is needed")
        return value

    @property
    def levels(self) -> tuple[str, ...]:
        """The configured levels, in configuration order."""
        return tuple(self.slice_params)

    @property
    def uses_deep_learning(self) -> bool:
        """Whether any stage runs a network."""
        return self.slice_selection_weights is not None or any(
            p.model_weights is not None for p in self.slice_params.values()
        )


def check_weights_format(path: Path) -> None:
    """Refuse a weights file this package cannot load before torch tries to unpickle it.

    Raises
    ------
    ValueError
        If ``path`` is a Keras/HDF5 weights file (by suffix or by its HDF5 signature): the
        message says that ``.pt`` checkpoints of this package are supported and how to get one.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(len(HDF5_SIGNATURE))
    except OSError:
        head = b""
    if path.suffix.lower() in KERAS_SUFFIXES or head == HDF5_SIGNATURE:
        raise ValueError(
            f"{path} is a Keras/HDF5 weights file; this package runs PyTorch checkpoints (.pt) written by "
            "'dicom-node train body-segmentation' and 'dicom-node train slice-selection' (training sets from "
            "'dicom-node prepare'). Keras weights cannot be converted automatically: train on your data with "
            "those commands, or leave the weights key out to use the classical path"
        )


def _format_error(source: str, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        lines.append(f"{source}: {key}: {error['msg']}")
    return "\n".join(lines)


def parse_model_config(
    data: Mapping[str, Any], *, base_dir: Path | None = None, source: str = "model config"
) -> BodyCompModelConfig:
    """Validate a configuration given as a mapping (parsed JSON, a TOML table, plugin options).

    Parameters
    ----------
    data
        The configuration keys.
    base_dir
        Folder relative weight paths are resolved against; ``None`` leaves them as given.
    source
        Named in error messages.

    Returns
    -------
    BodyCompModelConfig

    Raises
    ------
    ModelConfigError
        Naming each invalid key, or a weight file that does not exist.
    """
    try:
        config = BodyCompModelConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ModelConfigError(_format_error(source, exc)) from None
    if base_dir is None:
        return config

    def resolve(path: str | None, key: str) -> str | None:
        if path is None:
            return None
        full = Path(path) if Path(path).is_absolute() else base_dir / path
        if not full.is_file():
            raise ModelConfigError(f"{source}: {key}: weight file {full} does not exist")
        try:
            check_weights_format(full)
        except ValueError as exc:
            raise ModelConfigError(f"{source}: {key}: {exc}") from None
        return str(full)

    levels = {
        name: params.model_copy(update={
            "model_weights": resolve(params.model_weights, f"slice_params.{name}.model_weights")
        })
        for name, params in config.slice_params.items()
    }
    return config.model_copy(update={
        "slice_selection_weights": resolve(config.slice_selection_weights, "slice_selection_weights"),
        "slice_params": levels,
    })


def load_model_config(path: Path) -> BodyCompModelConfig:
    """Read a configuration from a ``.json`` or ``.toml`` file.

    Raises
    ------
    ModelConfigError
        If the file cannot be read or parsed, or a key is invalid.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: the configuration must be an object")
    return parse_model_config(data, base_dir=path.parent, source=path.name)
