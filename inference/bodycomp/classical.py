"""The classical body-composition path: HU thresholds, body outline, abdominal wall and a vertebral-level finder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, signal
from scipy.spatial import ConvexHull

logger = logging.getLogger(__name__)

#: Tissue windows in Hounsfield units (Mitsiopoulos et al. 1998; Shen et al. 2004).
MUSCLE_HU = (-29.0, 150.0)
ADIPOSE_HU = (-190.0, -30.0)
#: Anything above this is the patient (air and lung are about -1000 to -700 HU).
BODY_HU = -500.0
#: Cortical and cancellous bone of a vertebra in an adult, above disc and muscle.
BONE_HU = 150.0
#: Pixels above this joined to bone are bone edge (partial volume) or costal cartilage (about
#: 100-140 HU when not calcified), not muscle, although inside the muscle window: muscle
#: attenuation averages 30-60 HU in adults (Aubrey et al. 2014) and rarely exceeds 100 HU.
SKELETON_EDGE_HU = 100.0

#: Label values of the compartments in every label map of this package.
MUSCLE, SUBCUTANEOUS_FAT, VISCERAL_FAT = 1, 2, 3

#: Polar sampling of a slice around the body centroid.
N_ANGLES = 360
RADIAL_STEP_MM = 0.5
#: Fat deeper than this under the skin is not subcutaneous (no subcutaneous layer on that ray).
MAX_SKIN_TO_FAT_MM = 12.0
#: A tissue run along a ray must be this long to count: thinner strands are septa or skin.
MIN_RUN_MM = 3.0
#: Median window along the angle that bridges gaps in the muscle wall (linea alba, septa).
WALL_SMOOTHING_DEG = 21
#: Deepest muscle wall taken from the outer fascia inwards: the paraspinal muscles behind
#: (within 50 degrees of straight back) are the thickest; elsewhere the wall is thinner, and
#: a deeper dense run is an organ (liver, kidney, bowel) resting on it.
MAX_WALL_MM = 80.0
MAX_WALL_ANTEROLATERAL_MM = 25.0
POSTERIOR_SECTOR_DEG = 50.0
#: The outer fascia is a smooth contour: where it dips deeper than a rectus abdominis is thick
#: (about 10 mm in adults, Rankin et al. 2006) below its median over a sixth of the circumference,
#: the rays passed through a gap in the wall (linea alba, diastasis recti) into pre-peritoneal fat
#: and the fascia is bridged across at that depth, so that the fat in the gap is not subcutaneous.
FASCIA_NOTCH_MM = 10.0
FASCIA_CONTEXT_DEG = 61
#: Smoothed HU above which the anterolateral wall ends (solid organs; muscle's median here is ~20).
ORGAN_HU = 40.0
#: Gas in the cavity, and how far fat-range pixels next to it are taken as bowel contents.
GAS_HU = -250.0
GAS_MARGIN_MM = 3.0
#: Smaller pieces of fat-range pixels in the cavity are noise or bowel contents, not visceral fat.
MIN_VISCERAL_MM2 = 20.0

#: The psoas lies in the cavity against the side of the vertebral body: tissue in the muscle
#: window there is grown into it from within ``PSOAS_SEED_MM`` of the vertebra, after cutting
#: bridges thinner than ``PSOAS_OPEN_MM`` (to the kidney, a crus or bowel); a piece larger than
#: ``PSOAS_MAX_MM2`` (one psoas is well under 25 cm² even at L4-L5 in large adults), centred
#: farther than ``PSOAS_REACH_MM`` from the vertebral body or in front of it, is something else.
PSOAS_SEED_MM = 4.5
PSOAS_OPEN_MM = 3.0
PSOAS_MAX_MM2 = 2500.0
PSOAS_REACH_MM = 60.0
PSOAS_MIN_LATERAL_MM = 15.0
PSOAS_WINDOW_MARGIN_MM = 40.0
#: The vertebra that no psoas enters: body, canal and laminae, this wide and deep from the
#: anterior cortex (lumbar bodies are 40-50 mm wide and 30-35 mm deep).
VERTEBRA_HALF_WIDTH_MM = 27.0
VERTEBRA_DEPTH_MM = 60.0

#: Spine search: half-width of the midline band and the vertebral body box, in millimetres.
SPINE_BAND_MM = 20.0
BODY_BOX_MM = (8.0, 8.0)
#: Depth from the anterior cortex to the centre of a vertebral body (lumbar bodies are ~30-35 mm).
BODY_CENTRE_DEPTH_MM = 13.0
#: Bone farther than this from the spine's midline, left or right, is rib or pelvis.
LATERAL_BONE_MM = 60.0
#: Shortest spacing of two intervertebral discs along z (a T10-L5 body with its disc is 25-40 mm; upper thoracic levels are out of reach).
MIN_DISC_SPACING_MM = 24.0
LEVEL_NAMES = tuple(f"C{i}" for i in range(1, 8)) + tuple(f"T{i}" for i in range(1, 13)) + tuple(
    f"L{i}" for i in range(1, 6)
) + ("S1",)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))


def _disk(radius_px: tuple[float, float]) -> np.ndarray:
    ry, rx = (max(1, int(round(r))) for r in radius_px)
    y, x = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    return np.asarray((y / ry) ** 2 + (x / rx) ** 2 <= 1.0)


def body_mask(hu: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """Return the patient's body outline on one axial slice.

    Everything above ``BODY_HU`` is opened with a 3 mm disc (detaches the table and
    blankets), the largest component kept and its holes (bowel gas, lung) filled.

    Parameters
    ----------
    hu
        2D slice in Hounsfield units, rows then columns.
    spacing_mm
        Row and column spacing in millimetres.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the slice's shape; empty when no tissue is present.
    """
    mask = hu > BODY_HU
    if not mask.any():
        return mask
    radius = (3.0 / spacing_mm[0], 3.0 / spacing_mm[1])
    opened = ndimage.binary_opening(mask, structure=_disk(radius))
    if opened.any():
        mask = opened
    return np.asarray(ndimage.binary_fill_holes(_largest_component(mask)))


def _first_run(flags: np.ndarray, start: int, run: int) -> int | None:
    """Index of the first sample at or below ``start`` (walking down) that begins a run of
    ``run`` consecutive true flags, or ``None``."""
    count = 0
    for index in range(start, -1, -1):
        count = count + 1 if flags[index] else 0
        if count >= run:
            return index + run - 1
    return None


@dataclass(frozen=True)
class WallProfile:
    """The abdominal wall of one slice in polar form around the body centroid.

    ``outer_mm`` is the radius of the outer muscle fascia (subcutaneous fat lies outside it),
    ``inner_mm`` the inner edge of the muscle wall, one value per degree.
    """

    centre_px: tuple[float, float]
    outer_mm: np.ndarray
    inner_mm: np.ndarray


def find_wall(hu: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float]) -> WallProfile:
    """Find the muscle wall along rays cast from the body centroid.

    Walking inwards from the skin on each ray: the first run of fat (at least ``MIN_RUN_MM``:
    the dermis of the back is thick enough to pass for a muscle behind a sample of partial
    volume at the skin's edge) within ``MAX_SKIN_TO_FAT_MM`` starts the subcutaneous layer,
    the first dense run (> -30 HU, at least ``MIN_RUN_MM``) after it is the outer fascia; the
    wall ends at the next run of fat, air or bone. Both
    radii are median-filtered along the angle over ``WALL_SMOOTHING_DEG`` so that gaps in
    the wall (linea alba, hernia, septa) do not let visceral fat through.

    Parameters
    ----------
    hu, body
        One axial slice in HU and its body mask, rows running from anterior to posterior.
    spacing_mm
        Row and column spacing.

    Returns
    -------
    WallProfile
    """
    sy, sx = spacing_mm
    ys, xs = np.nonzero(body)
    cy, cx = float(ys.mean()), float(xs.mean())
    reach = float(np.max(np.hypot((ys - cy) * sy, (xs - cx) * sx))) + 2.0
    radii = np.arange(0.0, reach, RADIAL_STEP_MM)
    angles = np.radians(np.arange(N_ANGLES) * 360.0 / N_ANGLES)
    rows = cy + np.outer(np.sin(angles), radii) / sy
    cols = cx + np.outer(np.cos(angles), radii) / sx
    polar = ndimage.map_coordinates(hu, [rows, cols], order=1, cval=-1000.0)
    polar = ndimage.uniform_filter1d(polar, 3, axis=1)
    inside = ndimage.map_coordinates(body.astype(np.float32), [rows, cols], order=0, cval=0.0) > 0.5
    run = max(1, int(round(MIN_RUN_MM / RADIAL_STEP_MM)))
    skin_gap = int(round(MAX_SKIN_TO_FAT_MM / RADIAL_STEP_MM))
    posterior = np.abs(np.degrees(angles) - 90.0) <= POSTERIOR_SECTOR_DEG
    wall_mm = np.where(posterior, MAX_WALL_MM, MAX_WALL_ANTEROLATERAL_MM)
    outer = np.zeros(N_ANGLES)
    inner = np.zeros(N_ANGLES)
    for a in range(N_ANGLES):
        on_ray = np.nonzero(inside[a])[0]
        if on_ray.size == 0:
            continue
        skin = int(on_ray[-1])
        profile = polar[a]
        fat = (profile >= ADIPOSE_HU[0]) & (profile <= ADIPOSE_HU[1])
        dense = profile > ADIPOSE_HU[1]
        # a run as long as a tissue run must be: the skin's edge (partial volume with air)
        # passes through the fat window for a sample or two
        fat_start = _first_run(fat[: skin + 1], skin, run)
        wall = None
        if fat_start is not None and skin - fat_start <= skin_gap:
            wall = _first_run(dense[: fat_start + 1], fat_start, run)
        if wall is None:
            wall = max(0, skin - int(round(2.0 / RADIAL_STEP_MM)))
        stop = (profile <= ADIPOSE_HU[1]) | (profile > BONE_HU)
        if not posterior[a]:
            # the liver and spleen lie against the anterolateral wall with no fat between:
            # the wall ends where tissue turns denser than muscle
            stop |= profile > ORGAN_HU
        max_wall = int(round(wall_mm[a] / RADIAL_STEP_MM))
        end = _first_run(stop[: wall + 1], wall, run)
        end = max(0, wall - max_wall) if end is None else max(end, wall - max_wall)
        outer[a], inner[a] = radii[wall], radii[end]
    size = WALL_SMOOTHING_DEG
    context = ndimage.median_filter(outer, size=FASCIA_CONTEXT_DEG, mode="wrap")
    outer = np.maximum(outer, context - FASCIA_NOTCH_MM)
    outer = ndimage.median_filter(outer, size=size, mode="wrap")
    inner = ndimage.median_filter(inner, size=size, mode="wrap")
    return WallProfile((cy, cx), outer, np.minimum(inner, outer))


def segment_slice(
    hu: np.ndarray, spacing_mm: tuple[float, float], *, thoracic: bool = False
) -> np.ndarray:
    """Label muscle, subcutaneous fat and visceral fat on one axial slice by HU thresholds.

    Muscle is -29..150 HU within the muscle wall (between its outer fascia and its inner
    edge, which ends at fat, gas, bone or, anterolaterally, at denser organs such as the
    liver), less bone edges and costal cartilage (pixels above ``SKELETON_EDGE_HU`` joined to
    bone), and the psoas beside the vertebral body (:func:`psoas_mask`); adipose tissue is
    -190..-30 HU, subcutaneous outside the outer fascia, visceral inside the inner edge. Fat within the wall is subcutaneous where it is continuous with the
    subcutaneous layer and unlabelled where enclosed (intermuscular); the body's outermost
    pixels (skin) are not fat; fat-range pixels next to gas in the cavity (bowel contents) and
    pieces under ``MIN_VISCERAL_MM2`` are not visceral fat.

    Parameters
    ----------
    hu
        2D axial slice in HU, rows from anterior to posterior (the stack of
        :func:`inference.bodycomp.classical` callers is in ``("S", "P", "L")`` order).
    spacing_mm
        Row and column spacing in millimetres.
    thoracic
        No visceral class (fat inside the wall stays 0) and no psoas.

    Returns
    -------
    numpy.ndarray
        uint8 labels: 0 background, ``MUSCLE``, ``SUBCUTANEOUS_FAT``, ``VISCERAL_FAT``.
    """
    labels = np.zeros(hu.shape, dtype=np.uint8)
    body = body_mask(hu, spacing_mm)
    if np.count_nonzero(body) < 50:
        return labels
    wall = find_wall(hu, body, spacing_mm)
    rows, cols = np.indices(hu.shape, dtype=np.float64)
    dy, dx = (rows - wall.centre_px[0]) * spacing_mm[0], (cols - wall.centre_px[1]) * spacing_mm[1]
    radius = np.hypot(dy, dx)
    angle = (np.round(np.degrees(np.arctan2(dy, dx)) * N_ANGLES / 360.0).astype(int)) % N_ANGLES
    outer, inner = wall.outer_mm[angle], wall.inner_mm[angle]
    fat = body & (hu >= ADIPOSE_HU[0]) & (hu <= ADIPOSE_HU[1])
    muscle = body & (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1]) & (radius <= outer) & (radius >= inner)
    dense, _ = ndimage.label(body & (hu > SKELETON_EDGE_HU))
    skeleton = np.unique(dense[hu > BONE_HU])
    not_bone = ~np.isin(dense, skeleton[skeleton > 0])
    muscle &= not_bone
    if not thoracic:
        in_window = body & (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1]) & not_bone
        muscle |= psoas_mask(hu, body, in_window & (radius < inner) & ~muscle, spacing_mm)
    labels[muscle] = MUSCLE
    # the body's outermost pixels are skin (partial volume with air), not fat
    subcutaneous = fat & (radius > outer) & ndimage.binary_erosion(body)
    # fat in a gap of the back muscles that is continuous with the subcutaneous layer (behind the
    # spinous processes) is subcutaneous; enclosed specks stay unlabelled, and so does fat in a
    # gap of the anterolateral wall (pre-peritoneal fat under the linea alba is not subcutaneous)
    posterior = np.abs(np.degrees(np.arctan2(dy, dx)) - 90.0) <= POSTERIOR_SECTOR_DEG
    in_wall = fat & (radius <= outer) & (radius >= inner) & posterior
    pieces, _ = ndimage.label(in_wall | subcutaneous)
    joined = np.unique(pieces[subcutaneous])
    subcutaneous |= in_wall & np.isin(pieces, joined[joined > 0])
    labels[subcutaneous] = SUBCUTANEOUS_FAT
    if not thoracic:
        visceral = fat & (radius <= outer)
        # fat between the muscles of the wall (intermuscular fat, e.g. between the back muscles)
        # is neither visceral nor subcutaneous
        visceral &= radius < inner
        # bowel contents mixed with gas fall in the fat range: not visceral fat
        gas = body & (hu < GAS_HU) & (radius < inner)
        near_gas = ndimage.binary_dilation(gas, structure=_disk((GAS_MARGIN_MM / spacing_mm[0],
                                                                 GAS_MARGIN_MM / spacing_mm[1])))
        visceral &= ~near_gas
        pieces, _ = ndimage.label(visceral)
        sizes = np.bincount(pieces.ravel()) * spacing_mm[0] * spacing_mm[1]
        sizes[0] = 0
        visceral &= sizes[pieces] >= MIN_VISCERAL_MM2
        labels[visceral] = VISCERAL_FAT
    return labels


@dataclass(frozen=True)
class SpineTrack:
    """The vertebral column followed along z, and the levels found on it.

    All positions are slice indices of the axial stack (increasing towards the head).
    ``profile`` is the mean HU in the vertebral-body box per slice, ``discs`` the slices of
    the intervertebral discs found as its minima, ``bodies`` the vertebral body centres
    between them, ``levels`` the level name of each labelled body centre, ``anchor`` how the
    labels were fixed (``"pelvis"``, ``"ribs"`` or ``"none"``) and ``notes`` what to trust.
    """

    profile: np.ndarray
    discs: tuple[float, ...]
    bodies: tuple[float, ...]
    levels: dict[str, float] = field(default_factory=dict)
    anchor: str = "none"
    notes: tuple[str, ...] = ()

    def position(self, level: str) -> float | None:
        """Return the slice position (fractional index) of ``level``, or ``None``."""
        return self.levels.get(level)


def _spine_band(body: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """Where the vertebra lies on an axial slice: a band ``SPINE_BAND_MM`` either side of the
    body's midline, from 10 mm in front of its centroid backwards (rows anterior to posterior)."""
    sy, sx = spacing_mm
    ys, xs = np.nonzero(body)
    rows, cols = np.indices(body.shape)
    return np.asarray((np.abs(cols - xs.mean()) * sx < SPINE_BAND_MM) & (rows > ys.mean() - 10.0 / sy))


def _vertebra(hu: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray | None:
    """The vertebra on one axial slice, within the spine band: the bone component (3 mm gaps
    closed, so that a fragmented cortex is one piece) with most pixels in the band; ``None``
    when it has under 1 cm² there."""
    sy, sx = spacing_mm
    closed = ndimage.binary_closing(body & (hu > BONE_HU), structure=_disk((3.0 / sy, 3.0 / sx))) & body
    components, count = ndimage.label(closed)
    if count == 0:
        return None
    in_band = _spine_band(body, spacing_mm)
    band_counts = np.bincount(components[in_band], minlength=count + 1)
    band_counts[0] = 0
    best = int(np.argmax(band_counts))
    if band_counts[best] * sy * sx < 100.0:
        return None
    return np.asarray((components == best) & in_band)


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The pixels inside the convex hull of ``mask`` (``mask`` itself when it has no area)."""
    points = np.argwhere(mask)
    if len(points) < 3 or np.linalg.matrix_rank(points - points.mean(axis=0)) < 2:
        return mask.astype(bool)
    (top, left), (bottom, right) = points.min(axis=0), points.max(axis=0) + 1
    grid = np.indices((bottom - top, right - left)).reshape(2, -1).T + (top, left)
    hull = mask.astype(bool)
    planes = ConvexHull(points).equations  # inside: normal . point + offset <= 0 for every facet
    inside = np.all(grid @ planes[:, :2].T + planes[:, 2] <= 1e-6, axis=1)
    hull[top:bottom, left:right] |= inside.reshape(bottom - top, right - left)
    return hull


def psoas_mask(hu: np.ndarray, body: np.ndarray, candidates: np.ndarray,
               spacing_mm: tuple[float, float]) -> np.ndarray:
    """Find the psoas muscles on one axial slice among ``candidates``.

    The vertebral body's anterior cortex is the front of the bone in the spine band
    (:func:`_spine_band`); the vertebra is the convex hull of the bone within
    ``VERTEBRA_HALF_WIDTH_MM`` of its midline and ``VERTEBRA_DEPTH_MM`` behind that front, so
    that its marrow and canal (both in the muscle window) are never taken. Candidates outside it
    are opened with a ``PSOAS_OPEN_MM`` disc; a piece that lies within ``PSOAS_SEED_MM`` of the
    vertebra, is under ``PSOAS_MAX_MM2``, centred within ``PSOAS_REACH_MM`` of the vertebral
    body and not in front of it is psoas, with the candidate pixels the opening took off its edge.

    Limits: at a disc level (no bony ring) nothing is found; a diaphragmatic crus lying against
    the psoas at T12-L2 is taken with it; a psoas fused to the kidney or bowel by a bridge
    thicker than the opening is refused whole (then left out, never over-grown).

    Parameters
    ----------
    hu, body
        One axial slice in HU and its body mask, rows anterior to posterior.
    candidates
        Pixels that may be psoas: in the muscle window, inside the abdominal wall, not yet muscle.
    spacing_mm
        Row and column spacing.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the psoas (both sides); empty when no vertebra is found.
    """
    sy, sx = spacing_mm
    found = np.zeros(hu.shape, dtype=bool)
    by, bx = np.nonzero(body & (hu > BONE_HU) & _spine_band(body, spacing_mm))
    if by.size * sy * sx < 100.0:  # no vertebra (1 cm² of bone) in the band
        return found
    front = float(np.percentile(by, 2))
    mid = float(np.median(bx[by <= front + 15.0 / sy]))
    body_centre = (front + BODY_CENTRE_DEPTH_MM / sy, mid)
    # Work in a window around the vertebral body that holds any psoas: a piece reaching its
    # edge extends beyond where a psoas can be and is refused.
    half = (PSOAS_REACH_MM + PSOAS_WINDOW_MARGIN_MM) / sy, (PSOAS_REACH_MM + PSOAS_WINDOW_MARGIN_MM) / sx
    window = (slice(max(0, int(body_centre[0] - half[0])), int(body_centre[0] + half[0]) + 1),
              slice(max(0, int(body_centre[1] - half[1])), int(body_centre[1] + half[1]) + 1))
    hu_w, body_w, candidates_w = hu[window], body[window], candidates[window]
    rows, cols = np.indices(hu_w.shape)
    rows, cols = rows + window[0].start, cols + window[1].start
    near_midline = (np.abs(cols - mid) * sx < VERTEBRA_HALF_WIDTH_MM) & (rows >= front)
    vertebra = _convex_hull(body_w & (hu_w > BONE_HU) & near_midline & (rows <= front + VERTEBRA_DEPTH_MM / sy))
    vertebra = ndimage.binary_dilation(vertebra)
    candidates_w = candidates_w & ~vertebra
    disc = _disk((PSOAS_OPEN_MM / sy, PSOAS_OPEN_MM / sx))
    opened = ndimage.binary_opening(candidates_w, structure=disc)
    beside = ndimage.binary_dilation(vertebra, structure=_disk((PSOAS_SEED_MM / sy, PSOAS_SEED_MM / sx)))
    pieces, _ = ndimage.label(opened)
    edge = np.unique(np.concatenate([pieces[0], pieces[-1], pieces[:, 0], pieces[:, -1]]))
    keep = []
    for label in np.unique(pieces[beside & opened]):
        if label == 0 or label in edge:
            continue
        py, px = np.nonzero(pieces == label)
        py, px = py + window[0].start, px + window[1].start
        reach = float(np.hypot((py.mean() - body_centre[0]) * sy, (px.mean() - body_centre[1]) * sx))
        lateral = abs(px.mean() - mid) * sx
        if (py.size * sy * sx <= PSOAS_MAX_MM2 and reach <= PSOAS_REACH_MM and py.mean() >= front
                and lateral >= PSOAS_MIN_LATERAL_MM):
            keep.append(label)
    if keep:
        found[window] = ndimage.binary_dilation(np.isin(pieces, keep), structure=disc) & candidates_w
    return found


def _track_spine(
    stack: np.ndarray, spacing_mm: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: vertebral-body centre (row, column), lateral bone area (cm²) and whether
    the spine was found. Rows run anterior to posterior, columns right to left."""
    _, sy, sx = spacing_mm
    n = stack.shape[0]
    centre = np.full((n, 2), np.nan)
    lateral = np.zeros(n)
    pixel_cm2 = sy * sx / 100.0
    for k in range(n):
        hu = stack[k]
        body = body_mask(hu, (sy, sx))
        if np.count_nonzero(body) < 100:
            continue
        cx = np.nonzero(body)[1].mean()
        bone = body & (hu > BONE_HU)
        cols = np.indices(hu.shape)[1]
        lateral[k] = np.count_nonzero(bone & (np.abs(cols - cx) * sx > LATERAL_BONE_MM)) * pixel_cm2
        vertebra = _vertebra(hu, body, (sy, sx))
        if vertebra is None:
            continue
        vy, vx = np.nonzero(vertebra)
        centre[k] = (np.percentile(vy, 5) + BODY_CENTRE_DEPTH_MM / sy, vx.mean())
    return centre, lateral, np.isfinite(centre[:, 0])


def _smooth_track(values: np.ndarray, found: np.ndarray, size: int) -> np.ndarray:
    """A robust smooth curve through the per-slice positions: a running median, then a
    cubic fit that drops positions more than 8 mm-equivalent pixels from it, twice."""
    index = np.arange(values.size, dtype=np.float64)
    filled = np.interp(index, index[found], values[found])
    smooth = np.asarray(ndimage.median_filter(filled, size=size, mode="nearest"))
    keep = found.copy()
    degree = min(3, max(0, int(keep.sum()) - 1))
    for _ in range(2):
        if keep.sum() <= degree:
            break
        coefficients = np.polyfit(index[keep], values[keep], degree)
        fitted = np.polyval(coefficients, index)
        keep = found & (np.abs(values - fitted) < 3.0)
        smooth = fitted
    return smooth


def find_levels(stack: np.ndarray, spacing_mm: tuple[float, float, float]) -> SpineTrack:
    """Find the vertebral bodies along z and name them.

    Method: in each axial slice the vertebra is the bone (> 200 HU) component with most
    pixels in a 40 mm band around the body's midline, posterior to its centroid; the
    vertebral-body centre lies 13 mm behind its anterior cortex. The mean HU in a box there,
    slice by slice, dips at every intervertebral disc; discs are the minima of that profile
    (detrended, at least 18 mm apart). Names are fixed by an anchor: when the pelvis is in
    the scan (large bone areas lateral to the spine, in a run from the lowest slices), the
    iliac crest top marks the L4/L5 disc (the intercristal line); otherwise the lowest slice
    of a persistent run of bone more than 60 mm lateral to the spine (the tips of the 12th
    ribs) is taken to lie just below the centre of L1. A disc too faint to be found is put back in the middle
    of a gap longer than 1.4 median gaps.

    Limits: lumbosacral transitional vertebrae, 11 or 13 rib pairs, scoliosis, vertebral
    fractures, metal and scans that contain neither the iliac crests nor the lowest ribs
    give a wrong or no name; the anchor is reported with the result.

    Parameters
    ----------
    stack
        Axial stack in HU, axes (inferior to superior, anterior to posterior, right to left).
    spacing_mm
        Spacing along those axes.

    Returns
    -------
    SpineTrack
    """
    dz = spacing_mm[0]
    n = stack.shape[0]
    centre, lateral, found = _track_spine(stack, spacing_mm)
    notes: list[str] = []
    if found.sum() < 3:
        return SpineTrack(np.zeros(n), (), (), {}, "none", ("no spine found",))
    size = max(3, int(round(15.0 / dz)) | 1)
    cy = _smooth_track(centre[:, 0], found, size)
    cx = _smooth_track(centre[:, 1], found, size)
    hy = max(1, int(round(BODY_BOX_MM[0] / spacing_mm[1])))
    hx = max(1, int(round(BODY_BOX_MM[1] / spacing_mm[2])))
    profile = np.zeros(n)
    for k in range(n):
        y, x = int(round(cy[k])), int(round(cx[k]))
        box = stack[k, max(0, y - hy) : y + hy + 1, max(0, x - hx) : x + hx + 1]
        profile[k] = float(np.mean(np.clip(box, -100.0, 1000.0))) if box.size else 0.0
    trend = ndimage.uniform_filter1d(profile, max(3, int(round(60.0 / dz))), mode="nearest")
    detrended = profile - trend
    distance = max(1, int(round(MIN_DISC_SPACING_MM / dz)))
    minima, _ = signal.find_peaks(-detrended, distance=distance, prominence=20.0)
    discs = _fill_missed_discs([float(m) for m in minima])
    bodies = [0.5 * (a + b) for a, b in zip(discs[:-1], discs[1:], strict=False)]
    if len(discs) >= 2:
        height = float(np.median(np.diff(discs)))
        if discs[0] - 0.5 * height >= -0.25 * height:
            bodies.insert(0, discs[0] - 0.5 * height)
        if discs[-1] + 0.5 * height <= n - 1 + 0.25 * height:
            bodies.append(discs[-1] + 0.5 * height)
    levels: dict[str, float] = {}
    anchor = "none"
    crest = _iliac_crest(lateral, dz)
    rib = _lowest_rib(lateral, dz, crest)
    if crest is not None and len(bodies) >= 2:
        # The intercristal line crosses the L4/L5 disc in most adults: L4 is the first body above.
        l45 = min(discs, key=lambda d: abs(d - crest))
        above = [b for b in bodies if b > l45]
        if above:
            levels = _name_bodies(bodies, bodies.index(above[0]), "L4")
            anchor = "pelvis"
            notes.append(f"iliac crest top at slice {crest:.0f}, taken as the L4/L5 disc")
    if not levels and rib is not None and len(bodies) >= 2:
        # The tip of the 12th rib (its lowest point) lies just below the centre of L1.
        above_rib = [b for b in bodies if b > rib]
        if above_rib:
            levels = _name_bodies(bodies, bodies.index(above_rib[0]), "L1")
            anchor = "ribs"
            notes.append(f"lowest rib at slice {rib:.0f}, the first body above it taken as L1")
    if not levels:
        notes.append("neither the iliac crests nor the lowest ribs are in the scan: levels not named")
    logger.debug("spine: discs %s, bodies %s, levels %s (%s)", discs, bodies, levels, anchor)
    return SpineTrack(profile, tuple(discs), tuple(bodies), levels, anchor, tuple(notes))


def _fill_missed_discs(discs: list[float]) -> list[float]:
    """Insert discs evenly in any gap longer than 1.4 median gaps (a faint disc)."""
    if len(discs) < 3:
        return discs
    gap = float(np.median(np.diff(discs)))
    filled = [discs[0]]
    for disc in discs[1:]:
        missing = int(round((disc - filled[-1]) / gap)) - 1
        if (disc - filled[-1]) > 1.4 * gap and missing >= 1:
            step = (disc - filled[-1]) / (missing + 1)
            filled.extend(filled[-1] + step * (i + 1) for i in range(missing))
        filled.append(disc)
    return filled


def _name_bodies(bodies: list[float], index: int, level: str) -> dict[str, float]:
    """Name every body from the one at ``index`` being ``level`` (bodies ascend towards the head)."""
    names: dict[str, float] = {}
    reference = LEVEL_NAMES.index(level)
    for position, body_z in enumerate(bodies):
        name_index = reference - (position - index)
        if 0 <= name_index < len(LEVEL_NAMES):
            names[LEVEL_NAMES[name_index]] = body_z
    return names


def _lowest_rib(lateral_cm2: np.ndarray, dz: float, crest: float | None) -> float | None:
    """Lowest slice of a persistent run of bone far lateral to the spine above the pelvis."""
    run = max(2, int(round(9.0 / dz)))
    start = 0 if crest is None else int(crest) + max(1, int(round(30.0 / dz)))
    present = lateral_cm2 > 1.5
    for k in range(start, present.size - run + 1):
        if present[k : k + run].all():
            return float(k)
    return None


def _iliac_crest(lateral_cm2: np.ndarray, dz: float) -> float | None:
    """Top slice of the pelvis: the run of lateral bone that starts in the lowest slices."""
    present = lateral_cm2 > 2.0
    bottom = max(1, int(round(30.0 / dz)))
    if not present[:bottom].any() or lateral_cm2[:bottom].max() < 5.0:
        return None
    gap = max(1, int(round(6.0 / dz)))
    top, misses = 0, 0
    for k in range(present.size):
        if present[k]:
            top, misses = k, 0
        else:
            misses += 1
            if misses > gap and k > bottom:
                break
    return float(top)
