"""Render a one-page result summary (key slices, overlays, measurements) as an RGB array."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.valuerep import PersonName

from reports.identity import Identity
from reports.comparison import Comparison, measurement_key
from reports.protocols import FindingLike, MeasurementLike, QualityLike, StructureLike
from reports.trend import render_comparison

logger = logging.getLogger(__name__)

WIDTH_PX = 1024
MARGIN_PX = 24
GAP_PX = 16
MAX_KEY_SLICES = 3
#: Slices shown when the caller names them (e.g. the chosen slice of each of several levels).
MAX_SHOWN_SLICES = 6
FILL_ALPHA = 0.35
DISCLAIMER = "Automated analysis, not for diagnostic use: verify against the source images."

_BACKGROUND = (12, 12, 14)
_HEADER = (30, 36, 48)
_TEXT = (236, 236, 236)
_DIM = (160, 164, 172)
_RULE = (70, 74, 84)
_WARNING = (255, 196, 64)
_ALERT = (196, 30, 30)

#: How UCUM units are shown; "^" raises the next character (the bundled font has
#: no superscript glyphs).
_UNIT_DISPLAY = {
    "mm3": "mm^3",
    "cm3": "cm^3",
    "mm2": "mm^2",
    "cm2": "cm^2",
    "[hnsf'U]": "HU",
    "1": "",
    "{ratio}": "",
}

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class _Fonts:
    title: _Font
    body: _Font
    small: _Font
    superscript: _Font


def _load_fonts() -> _Fonts:
    # Pillow >= 10.1 bundles a scalable font, so no system font is assumed.
    return _Fonts(
        title=ImageFont.load_default(size=28),
        body=ImageFont.load_default(size=19),
        small=ImageFont.load_default(size=16),
        superscript=ImageFont.load_default(size=12),
    )


def load_volume(source_images: Sequence[Dataset]) -> np.ndarray:
    """Stack the source pixel data, modality LUT applied, as ``(n_slices, rows, columns)``.

    Parameters
    ----------
    source_images
        Single-frame images in slice order.

    Returns
    -------
    numpy.ndarray
        float32 volume.
    """
    return np.stack(
        [
            np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
            for ds in source_images
        ]
    )


def choose_key_slices(
    label_map: np.ndarray | None,
    structures: Sequence[StructureLike],
    n_slices: int,
    count: int = MAX_KEY_SLICES,
) -> list[int]:
    """Choose the slices to show: where the structures are largest.

    The slice with the largest total labelled area comes first, then each structure's
    largest slice; remaining places are spread over the labelled range. Without any
    label the middle slice is shown.

    Parameters
    ----------
    label_map
        Labels of shape ``(n_slices, rows, columns)``, or ``None``.
    structures
        The structures whose labels count.
    n_slices
        Number of slices in the series.
    count
        Most slices to return.

    Returns
    -------
    list[int]
        Slice indices in ascending order.
    """
    if label_map is None or not structures:
        return [n_slices // 2]
    labels = np.array([s.label for s in structures])
    labelled = np.isin(label_map, labels)
    total = labelled.reshape(n_slices, -1).sum(axis=1)
    if not total.any():
        return [n_slices // 2]
    chosen = [int(np.argmax(total))]
    areas = [(label_map == s.label).reshape(n_slices, -1).sum(axis=1) for s in structures]
    for area in sorted(areas, key=lambda a: -int(a.max())):
        if area.any() and int(np.argmax(area)) not in chosen:
            chosen.append(int(np.argmax(area)))
    occupied = np.flatnonzero(total)
    for index in np.linspace(occupied[0], occupied[-1], count + 2)[1:-1]:
        candidate = int(round(float(index)))
        if total[candidate] and candidate not in chosen:
            chosen.append(candidate)
    return sorted(chosen[:count])


def _window(volume: np.ndarray, source: Dataset) -> tuple[float, float]:
    if source.get("Modality") == "CT" and "WindowCenter" in source and "WindowWidth" in source:
        # CT windows are calibrated (HU); the stored one is what the modality chose.
        centre = float(np.atleast_1d(source.WindowCenter)[0])
        width = max(float(np.atleast_1d(source.WindowWidth)[0]), 1.0)
        return centre - width / 2, centre + width / 2
    # Percentiles rather than the stored window, which is often absent or wrong in
    # derived series; the top is kept generous so bright tissue does not saturate.
    low, high = np.percentile(volume, [0.5, 99.9])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def _orientation_letters(vector: Sequence[float]) -> str:
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    order = np.argsort(-np.abs(np.asarray(vector, dtype=float)))
    text = ""
    for axis in order:
        if abs(vector[axis]) > 0.3:
            text += letters[axis][int(vector[axis] > 0)]
    return text


def _panel(
    image: np.ndarray,
    labels: np.ndarray | None,
    structures: Sequence[StructureLike],
    window: tuple[float, float],
    size_px: tuple[int, int],
) -> Image.Image:
    low, high = window
    grey = np.clip((image - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(grey).resize(size_px, Image.Resampling.BICUBIC))
    rgb = np.repeat(base[..., None].astype(np.float32), 3, axis=2)
    if labels is not None:
        scaled = np.asarray(
            Image.fromarray(labels.astype(np.int32)).resize(size_px, Image.Resampling.NEAREST)
        )
        for structure in structures:
            mask = scaled == structure.label
            if not mask.any():
                continue
            colour = np.array(structure.colour_rgb, dtype=np.float32)
            rgb[mask] = rgb[mask] * (1.0 - FILL_ALPHA) + colour * FILL_ALPHA
            rgb[_outline(mask)] = colour
    return Image.fromarray(rgb.astype(np.uint8))


def _outline(mask: np.ndarray, width_px: int = 2) -> np.ndarray:
    inner = mask.copy()
    for _ in range(width_px):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    edge: np.ndarray = np.logical_and(mask, np.logical_not(inner))
    return edge


def _panel_size(source: Dataset, box_px: int) -> tuple[int, int]:
    row_mm, column_mm = (float(v) for v in source.get("PixelSpacing", [1.0, 1.0]))
    height_mm = int(source.Rows) * row_mm
    width_mm = int(source.Columns) * column_mm
    scale = box_px / max(height_mm, width_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def format_value(value: float) -> str:
    """Format a measured value with a precision that suits its magnitude.

    Parameters
    ----------
    value
        The value.

    Returns
    -------
    str
        E.g. ``"1,234"``, ``"12.3"``, ``"0.83"``.
    """
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_unit(unit_code: str) -> str:
    """Return how a UCUM unit is shown, with ``^`` before a superscript character.

    Parameters
    ----------
    unit_code
        The UCUM code value, e.g. ``"mm3"``.

    Returns
    -------
    str
        E.g. ``"mm^3"``; empty for dimensionless units.
    """
    return _UNIT_DISPLAY.get(unit_code, unit_code)


def _format_name(name: object) -> str:
    person = PersonName(str(name or ""))
    if person.family_name and person.given_name:
        return f"{person.family_name}, {person.given_name}"
    return str(person).replace("^", " ").strip() or "(no name)"


def _format_date(value: object) -> str:
    text = str(value or "")
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "(no date)"


class _Canvas:
    """A page that grows downwards as sections are drawn."""

    def __init__(self, fonts: _Fonts) -> None:
        self.image = Image.new("RGB", (WIDTH_PX, 4000), _BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.fonts = fonts
        self.y = 0

    def text(
        self,
        x: int,
        text: str,
        font: _Font,
        fill: tuple[int, int, int],
        superscripts: bool = False,
    ) -> int:
        """Draw text at the current line, with ``^`` superscripts if asked; return its end x."""
        parts = text.split("^") if superscripts else [text]
        self.draw.text((x, self.y), parts[0], font=font, fill=fill)
        x += int(self.draw.textlength(parts[0], font=font))
        for part in parts[1:]:
            if part:
                self.draw.text((x, self.y - 2), part[0], font=self.fonts.superscript, fill=fill)
                x += int(self.draw.textlength(part[0], font=self.fonts.superscript)) + 1
                self.draw.text((x, self.y), part[1:], font=font, fill=fill)
                x += int(self.draw.textlength(part[1:], font=font))
        return x

    def fit(self, text: str, font: _Font, max_width_px: int) -> str:
        """Shorten text with an ellipsis until it fits in the given width."""
        if self.width(text, font) <= max_width_px:
            return text
        while text and self.width(text + "\u2026", font) > max_width_px:
            text = text[:-1]
        return text.rstrip() + "\u2026"

    def width(self, text: str, font: _Font, superscripts: bool = False) -> int:
        """Width of text in pixels (superscripts counted at full size, a small margin)."""
        shown = text.replace("^", "") if superscripts else text
        return int(self.draw.textlength(shown, font=font))

    def wrapped(self, text: str, font: _Font, fill: tuple[int, int, int], step_px: int) -> None:
        """Draw text over as many lines as the page width needs."""
        line = ""
        for word in text.split():
            trial = f"{line} {word}".strip()
            if line and self.width(trial, font) > WIDTH_PX - 2 * MARGIN_PX:
                self.text(MARGIN_PX, line, font, fill)
                self.y += step_px
                line = word
            else:
                line = trial
        if line:
            self.text(MARGIN_PX, line, font, fill)
            self.y += step_px

    def rule(self) -> None:
        self.draw.line((MARGIN_PX, self.y, WIDTH_PX - MARGIN_PX, self.y), fill=_RULE, width=1)
        self.y += 12

    def result(self) -> np.ndarray:
        """The page drawn so far, as an RGB uint8 array."""
        page: np.ndarray = np.asarray(self.image.crop((0, 0, WIDTH_PX, self.y)), dtype=np.uint8)
        return page


def _draw_header(canvas: _Canvas, source: Dataset, n_images: int, title: str) -> None:
    fonts = canvas.fonts
    canvas.draw.rectangle((0, 0, WIDTH_PX, 150), fill=_HEADER)
    canvas.y = 14
    canvas.text(MARGIN_PX, title, fonts.title, _TEXT)
    canvas.y += 42
    patient = f"{_format_name(source.get('PatientName'))}   ID {source.get('PatientID') or '-'}"
    for keyword, label in (("PatientSex", "Sex"), ("PatientAge", "Age")):
        if source.get(keyword):
            patient += f"   {label} {source.get(keyword)}"
    canvas.text(MARGIN_PX, patient, fonts.body, _TEXT)
    canvas.y += 26
    description = source.get("StudyDescription") or "(no description)"
    study = f"Study {_format_date(source.get('StudyDate'))}   {description}"
    if source.get("AccessionNumber"):
        study += f"   Acc. {source.get('AccessionNumber')}"
    canvas.text(MARGIN_PX, study, fonts.small, _DIM)
    canvas.y += 24
    number = source.get("SeriesNumber")
    details = [str(source.get("Modality", "")), f"{n_images} images"]
    if number not in (None, ""):
        details.insert(0, f"series {number}")
    series = (
        f"Series analysed: {source.get('SeriesDescription') or '(no description)'}"
        f"   ({', '.join(d for d in details if d)})"
    )
    canvas.text(MARGIN_PX, series, fonts.small, _DIM)
    canvas.y = 166


def _draw_panels(
    canvas: _Canvas,
    source_images: Sequence[Dataset],
    volume: np.ndarray,
    label_map: np.ndarray | None,
    structures: Sequence[StructureLike],
    key_slices: Sequence[int],
) -> None:
    fonts = canvas.fonts
    count = len(key_slices)
    box_px = min(320, (WIDTH_PX - 2 * MARGIN_PX - (count - 1) * GAP_PX) // count)
    size = _panel_size(source_images[0], box_px)
    window = _window(volume, source_images[0])
    total_px = count * size[0] + (count - 1) * GAP_PX
    x = (WIDTH_PX - total_px) // 2
    orientation = [float(v) for v in source_images[0].get("ImageOrientationPatient", [])]
    for index in key_slices:
        labels = None if label_map is None else label_map[index]
        panel = _panel(volume[index], labels, structures, window, size)
        canvas.image.paste(panel, (x, canvas.y))
        if len(orientation) == 6:
            # Row vector points to the right edge, column vector to the bottom edge.
            left = _orientation_letters([-v for v in orientation[:3]])
            top = _orientation_letters([-v for v in orientation[3:]])
            middle = (x + 4, canvas.y + size[1] // 2 - 8)
            canvas.draw.text(middle, left, font=fonts.small, fill=_WARNING)
            centre = (x + size[0] // 2 - 5, canvas.y + 2)
            canvas.draw.text(centre, top, font=fonts.small, fill=_WARNING)
        instance = source_images[index].get("InstanceNumber")
        caption = f"Slice {index + 1}/{len(source_images)}"
        if instance not in (None, ""):
            caption += f"  (image {instance})"
        caption_x = x + (size[0] - canvas.width(caption, fonts.small)) // 2
        canvas.draw.text((caption_x, canvas.y + size[1] + 6), caption, font=fonts.small, fill=_DIM)
        x += size[0] + GAP_PX
    canvas.y += size[1] + 34


def _draw_legend(canvas: _Canvas, structures: Sequence[StructureLike]) -> None:
    fonts = canvas.fonts
    x = MARGIN_PX
    for structure in structures:
        width = 26 + canvas.width(structure.name, fonts.body) + 28
        if x + width > WIDTH_PX - MARGIN_PX and x > MARGIN_PX:
            x = MARGIN_PX
            canvas.y += 28
        _swatch(canvas, x, structure.colour_rgb)
        canvas.text(x + 26, structure.name, fonts.body, _TEXT)
        x += width
    canvas.y += 36


def _swatch(canvas: _Canvas, x: int, colour: tuple[int, int, int]) -> None:
    top = canvas.y + 4
    canvas.draw.rectangle((x, top, x + 16, top + 16), fill=tuple(colour), outline=_TEXT)


def _draw_measurements(
    canvas: _Canvas,
    structures: Sequence[StructureLike],
    measurements: Sequence[MeasurementLike],
) -> None:
    fonts = canvas.fonts
    colours = {s.label: s.colour_rgb for s in structures}
    columns = (MARGIN_PX + 26, MARGIN_PX + 440, MARGIN_PX + 760)
    canvas.text(MARGIN_PX, "Measurements", fonts.body, _TEXT)
    canvas.y += 30
    for header, x in (("Structure / item", columns[0]), ("Quantity", columns[1])):
        canvas.text(x, header, fonts.small, _DIM)
    canvas.text(columns[2] - canvas.width("Value", fonts.small), "Value", fonts.small, _DIM)
    canvas.y += 24
    for measurement in measurements:
        if measurement.structure_label in colours:
            _swatch(canvas, MARGIN_PX, colours[measurement.structure_label])
        name = canvas.fit(measurement.name, fonts.body, columns[1] - columns[0] - 16)
        canvas.text(columns[0], name, fonts.body, _TEXT)
        quantity = canvas.fit(measurement.concept[2], fonts.body, 200)
        canvas.text(columns[1], quantity, fonts.body, _DIM)
        unit = format_unit(measurement.unit[0])
        value = f"{format_value(float(measurement.value))} {unit}".strip()
        value_x = columns[2] - canvas.width(value, fonts.body, superscripts=True)
        canvas.text(value_x, value, fonts.body, _TEXT, superscripts=True)
        canvas.y += 28
    canvas.y += 8


def _draw_quality_banner(canvas: _Canvas, quality: QualityLike) -> None:
    """A full-width red band under the header: the first thing read on the page."""
    fonts = canvas.fonts
    lines = [f"- {reason}" for reason in quality.reasons]
    top = canvas.y - 8
    height = 16 + 40 + 26 * len(lines)
    canvas.draw.rectangle((0, top, WIDTH_PX, top + height), fill=_ALERT)
    canvas.y = top + 10
    canvas.text(MARGIN_PX, "LOW CONFIDENCE: check the segmentation before using these volumes",
                fonts.body, _TEXT)
    canvas.y += 32
    for line in lines:
        canvas.text(MARGIN_PX, canvas.fit(line, fonts.small, WIDTH_PX - 2 * MARGIN_PX), fonts.small, _TEXT)
        canvas.y += 26
    canvas.y = top + height + 16


def _draw_quality_line(canvas: _Canvas, quality: QualityLike) -> None:
    checks = ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in quality.checks.items())
    canvas.wrapped(f"Confidence checks passed ({checks})", canvas.fonts.small, _DIM, 22)


def _draw_findings(canvas: _Canvas, findings: Sequence[FindingLike]) -> None:
    fonts = canvas.fonts
    canvas.text(MARGIN_PX, "Classification", fonts.body, _TEXT)
    canvas.y += 30
    for finding in findings:
        probability = finding.probabilities.get(finding.predicted_class)
        line = f"{finding.name}: {finding.predicted_class}"
        if probability is not None:
            line += f" (p={float(probability):.2f})"
        canvas.wrapped(line, fonts.body, _TEXT, 28)
    canvas.y += 8


def render_report_png(
    source_images: Sequence[Dataset],
    label_map: np.ndarray | None,
    structures: Sequence[StructureLike],
    measurements: Sequence[MeasurementLike],
    findings: Sequence[FindingLike] = (),
    *,
    key_slices: Sequence[int] | None = None,
    title: str,
    model_name: str,
    model_version: str,
    method: str,
    identity: Identity,
    quality: QualityLike | None = None,
    comparison: Comparison | None = None,
    notes: Sequence[str] = (),
) -> np.ndarray:
    """Render the result summary a radiologist reads at a glance.

    A header with patient, study and analysed series; key slices with each structure
    as a semi-transparent fill and outline, and a legend; a measurement table with
    units; classification findings; the model, method and a not-for-diagnostic-use
    line. The layout grows with the number of structures, measurements and findings.

    Parameters
    ----------
    source_images
        The analysed single-frame images, in slice order, with pixel data.
    label_map
        Labels of shape ``(n_slices, rows, columns)`` in the same order, or ``None``
        for analyses without a segmentation.
    structures
        The structures in `label_map`.
    measurements
        Measurements to list.
    findings
        Classification findings to list.
    key_slices
        Slice indices to show (at most six are used), or ``None`` to choose the three
        slices where the structures are largest.
    title
        Heading of the page, e.g. the analysis name.
    model_name, model_version
        The model that produced the result.
    method
        One line on how the result was produced.
    identity
        Equipment identification (product name and version in the footer).
    quality
        The analysis' own judgement of the result: a low-confidence result gets a red band
        with the reasons under the header; a result that passed gets one line of check values.
    comparison
        The change since the prior study and the trend over every prior (a section after the
        measurements), or ``None`` for an analysis that does not compare with priors.
    notes
        Lines shown above the model line (the side, why no percentile is given).

    Returns
    -------
    numpy.ndarray
        RGB image, shape ``(height, 1024, 3)``, dtype uint8.

    Raises
    ------
    ValueError
        If there are no source images, the label map does not match them or a key
        slice is out of range.
    """
    if len(source_images) == 0:
        raise ValueError("no source images given")
    volume = load_volume(source_images)
    if label_map is not None and label_map.shape != volume.shape:
        raise ValueError(
            f"label_map shape {label_map.shape} does not match the source volume {volume.shape}"
        )
    if key_slices is None or len(key_slices) == 0:
        chosen = choose_key_slices(label_map, structures, volume.shape[0])
    else:
        chosen = [int(k) for k in key_slices][:MAX_SHOWN_SLICES]
    if any(not 0 <= k < volume.shape[0] for k in chosen):
        raise ValueError(f"key slices {chosen} out of range for {volume.shape[0]} slices")
    fonts = _load_fonts()
    canvas = _Canvas(fonts)
    _draw_header(canvas, source_images[0], len(source_images), title)
    if quality is not None and quality.low_confidence:
        _draw_quality_banner(canvas, quality)
    _draw_panels(canvas, source_images, volume, label_map, structures, chosen)
    if structures and label_map is not None:
        _draw_legend(canvas, structures)
    canvas.rule()
    if measurements:
        _draw_measurements(canvas, structures, measurements)
        canvas.rule()
    if findings:
        _draw_findings(canvas, findings)
        canvas.rule()
    if comparison is not None:
        colours = {measurement_key(m, structures): c for m in measurements
                   for s in structures if m.structure_label == s.label for c in [s.colour_rgb]}
        section = render_comparison(comparison, colours, WIDTH_PX)
        canvas.image.paste(section, (0, canvas.y))
        canvas.y += section.height
        canvas.rule()
    for note in notes:
        canvas.wrapped(note, fonts.small, _TEXT, 22)
    if quality is not None and not quality.low_confidence:
        _draw_quality_line(canvas, quality)
    canvas.wrapped(f"Model: {model_name} {model_version}", fonts.small, _DIM, 22)
    canvas.wrapped(f"Method: {method}", fonts.small, _DIM, 22)
    product = identity.manufacturer
    if identity.manufacturer_model_name != identity.manufacturer:
        product += f" {identity.manufacturer_model_name}"
    canvas.wrapped(f"Produced by {product} {identity.software_versions}", fonts.small, _DIM, 22)
    canvas.y += 4
    canvas.wrapped(DISCLAIMER, fonts.body, _WARNING, 28)
    canvas.y += 8
    logger.debug("rendered report preview with key slices %s", chosen)
    return canvas.result()
