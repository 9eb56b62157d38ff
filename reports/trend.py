"""Draw the change since the prior study and the volumes over time, as one section of the report page."""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from PIL import Image, ImageDraw, ImageFont

from reports.comparison import Comparison

_BACKGROUND = (12, 14, 18)
_TEXT = (236, 236, 236)
_DIM = (160, 164, 172)
_GRID = (70, 74, 84)
_WARNING = (255, 196, 64)
_OTHER = (236, 236, 236)
MARGIN_PX = 24
PLOT_HEIGHT_PX = 220


def _format_number(value: float, signed: bool = False) -> str:
    text = f"{value:+,.0f}" if signed else f"{value:,.0f}"
    return text


def _format_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f} %"


def render_comparison(
    comparison: Comparison,
    colours: Mapping[str, tuple[int, int, int]],
    width_px: int,
) -> Image.Image:
    """Render the "Change since prior study" section.

    Without a prior: one line, "no prior study found". With one: the prior's date and model
    (flagged when the model differs), a table of prior value, current value, change, percent
    and percent per year for each measurement, and a plot of every measurement over every
    study date found, oldest to newest.

    Parameters
    ----------
    comparison
        From :func:`reports.comparison.compare`.
    colours
        Line colour by measurement key; keys without one are drawn in white.
    width_px
        Width of the page.

    Returns
    -------
    PIL.Image.Image
        An RGB image ``width_px`` wide.
    """
    title_font = ImageFont.load_default(size=19)
    body = ImageFont.load_default(size=17)
    small = ImageFont.load_default(size=14)
    image = Image.new("RGB", (width_px, 900), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = 4
    draw.text((MARGIN_PX, y), "Change since prior study", font=title_font, fill=_TEXT)
    y += 30
    prior = comparison.prior
    if prior is None:
        draw.text((MARGIN_PX, y), "No prior study found for this patient.", font=body, fill=_DIM)
        return image.crop((0, 0, width_px, y + 30))
    days = comparison.interval_days or 0
    line = (f"Prior study {_iso(prior.study_date)}  ({days} days, {days / 365.25:.2f} years earlier);"
            f" {prior.model_name} {prior.model_version}, from the {prior.origin}")
    draw.text((MARGIN_PX, y), line, font=small, fill=_DIM)
    y += 22
    if comparison.other_model:
        draw.text((MARGIN_PX, y), "Prior measured with another model version: differences may come from"
                  " the model, not the patient.", font=small, fill=_WARNING)
        y += 22
    columns = (MARGIN_PX, 420, 540, 660, 790, width_px - MARGIN_PX)
    headers = ("Measurement", "Prior", "Now", "Change", "Change %", "% per year")
    for k, header in enumerate(headers):
        x = columns[k] if k == 0 else columns[k] - int(draw.textlength(header, font=small))
        draw.text((x, y), header, font=small, fill=_DIM)
    y += 22
    for change in comparison.changes:
        unit = "mm3" if change.unit == "mm3" else change.unit
        cells = (
            change.name,
            _format_number(change.prior),
            _format_number(change.current),
            f"{_format_number(change.change, signed=True)} {unit}",
            _format_percent(change.percent),
            _format_percent(comparison.percent_per_year(change)),
        )
        for k, cell in enumerate(cells):
            x = columns[k] if k == 0 else columns[k] - int(draw.textlength(cell, font=body))
            draw.text((x, y), cell, font=body, fill=_TEXT)
        y += 26
    y += 8
    y = _plot(draw, comparison, colours, y, width_px, small)
    return image.crop((0, 0, width_px, y + 8))


def _iso(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else value


def _plot(
    draw: ImageDraw.ImageDraw,
    comparison: Comparison,
    colours: Mapping[str, tuple[int, int, int]],
    top: int,
    width_px: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> int:
    """Volumes over time: one line per measurement of the table, dates on the x axis."""
    keys = [c.key for c in comparison.changes]
    points = [(date, values) for date, values in comparison.history if any(k in values for k in keys)]
    values = [v[k] for _, v in points for k in keys if k in v]
    if len(points) < 2 or not values:
        return top
    left, right = MARGIN_PX + 70, width_px - MARGIN_PX - 20
    bottom = top + PLOT_HEIGHT_PX - 30
    low, high = min(values), max(values)
    pad = max((high - low) * 0.1, abs(high) * 0.02, 1.0)
    low, high = low - pad, high + pad
    first, last = points[0][0], points[-1][0]
    span = max((last - first).days, 1)

    def xy(date: datetime.date, value: float) -> tuple[float, float]:
        x = left + (right - left) * (date - first).days / span
        return x, bottom - (bottom - top) * (value - low) / (high - low)

    for k in range(5):
        value = low + (high - low) * k / 4
        y = xy(first, value)[1]
        draw.line((left, y, right, y), fill=_GRID, width=1)
        label = f"{value:,.0f}"
        draw.text((left - 8 - draw.textlength(label, font=font), y - 8), label, font=font, fill=_DIM)
    for date, _ in points:
        x = xy(date, low)[0]
        label = date.isoformat()
        draw.text((x - draw.textlength(label, font=font) / 2, bottom + 6), label, font=font, fill=_DIM)
    for key in keys:
        colour = colours.get(key, _OTHER)
        series = [xy(date, v[key]) for date, v in points if key in v]
        if len(series) > 1:
            draw.line(series, fill=colour, width=3)
        for x, y in series:
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour, outline=_TEXT)
    return bottom + 30
