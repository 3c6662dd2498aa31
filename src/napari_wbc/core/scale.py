"""Estimating the WBC diameter (pixels) of a smear from its red cells.

Red cells are the most common object on every smear and their size is
biologically tight (~7.5 um), while WBCs are ~1.5-2.5x larger. The typical
red-cell radius is read off the distance transform of the cell foreground
(holes such as the central pallor filled): its 90th percentile over the
foreground is 0.684 of a disc's radius; the WBC diameter is a fixed multiple of it, calibrated on the
training sets (see benchmarks/segmentation.py).
"""
from __future__ import annotations

import numpy as np

# WBC diameter / red-cell diameter: median ratio on SigTuple patches 1.59, SigTuple smears 1.84, BCCD 1.78.
WBC_PER_RBC = 1.7
MIN_DIAMETER, MAX_DIAMETER = 12.0, 600.0
# A WBC that is to be counted lies inside the image: an estimate larger than this share of the image's
# longer side is impossible. It happens on tight single-cell crops, where the WBC itself, not the red
# cells, dominates the estimate (1.2x the side on some Tecom crops). The longer side, not the shorter:
# a thin strip cut from a smear keeps its red-cell estimate (capping it there turns red cells into WBCs).
MAX_SHARE_OF_SIDE = 0.8


def _downsample(rgb: np.ndarray, max_side: int = 640) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    return rgb[::step, ::step], float(step)


def percentile_from_counts(counts: np.ndarray, q: float, values: np.ndarray | None = None) -> float:
    """``np.percentile(v, q)`` (linear method, same value) from ``counts = np.bincount(v)``.

    ``values``: what each bin stands for (default: its index), increasing.
    """
    cum = np.cumsum(counts)
    n = int(cum[-1])
    k = q / 100 * (n - 1)
    j = int(np.floor(k))
    a = int(np.searchsorted(cum, j, side="right"))  # bins of the j-th and (j+1)-th smallest values
    b = int(np.searchsorted(cum, min(j + 1, n - 1), side="right"))
    va, vb = (a, b) if values is None else (float(values[a]), float(values[b]))
    return float(va + (k - j) * (vb - va))


def _levels(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 as small non-negative integers: uint8 as it is, anything else scaled to 0..4095 by its
    maximum (after shifting its minimum to 0 when it is negative, e.g. a z-scored image)."""
    if rgb.dtype == np.uint8:
        return rgb
    x = rgb.astype(np.float32)  # (check_image brought float64 data into float32's range)
    lo = float(x.min())
    if lo < 0:
        x -= np.float32(lo)
    x *= np.float32(4095.0 / max(float(x.max()), 1e-30))  # any scale: 0..1e-4 as well
    np.clip(x, 0, 4095, out=x)
    return x.round().astype(np.uint16)


def _luminance(rgb: np.ndarray):
    """(integer levels, top level, 3x mean luminance as uint16, its histogram)."""
    q = _levels(rgb)
    top = 255 if q.dtype == np.uint8 else 4095
    lum = q[..., 0].astype(np.uint16)  # 3x the mean of the channels (faster than a sum over the last axis)
    lum += q[..., 1]
    lum += q[..., 2]
    return q, top, lum, np.bincount(lum.ravel(), minlength=3 * top + 1)


def _in_field(lum: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, bool]:
    """(in-field mask, whether that is everywhere).

    Out-of-field areas (black vignetting, slide edges) are neither cells nor background; they come
    in from the image's edges, so dark areas enclosed by the field (a nucleus on an under-exposed
    smear) stay in it. When under 5 % of the image would be in the field, all of it is.
    """
    in_field = lum > 0.25 * percentile_from_counts(counts, 99)
    everywhere = bool(in_field.all())
    if not everywhere:
        in_field = fill_holes(in_field)
        everywhere = bool(in_field.all())
    if not everywhere and in_field.sum() < 0.05 * lum.size:
        in_field, everywhere = np.ones_like(in_field), True
    return in_field, everywhere


def out_of_field(image: np.ndarray) -> np.ndarray | None:
    """Where an HxWx3 image lies outside the microscope's field (black vignetting, slide edges), on a
    grid of at most 640 px a side; None when the field is everywhere (the usual case)."""
    _, _, lum, counts = _luminance(_downsample(image)[0])
    in_field, everywhere = _in_field(lum, counts)
    return None if everywhere else ~in_field


def foreground(rgb_small: np.ndarray) -> np.ndarray:
    """Cells vs background: colour distance from the bright background, Otsu threshold.

    Works on integer levels (:func:`_levels`) with histogram statistics: every
    step is invariant to the image's overall scale, as the threshold is Otsu's.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    q, top, lum, counts = _luminance(rgb_small)
    in_field, everywhere = _in_field(lum, counts)
    if not everywhere:
        counts = np.bincount(lum[in_field], minlength=3 * top + 1)
    bright = (lum >= percentile_from_counts(counts, 90)) & in_field
    bg = np.array([percentile_from_counts(np.bincount(q[..., c][bright], minlength=top + 1), 50) for c in range(3)],
                  np.float32)
    lut = (np.arange(top + 1, dtype=np.float32)[None] - bg[:, None]) ** 2  # 3 x levels: squared channel distance
    d = lut[0][q[..., 0]]
    d += lut[1][q[..., 1]]
    d += lut[2][q[..., 2]]
    np.sqrt(d, out=d)
    d = ndi.gaussian_filter(d, 1.0)
    lo, hi = float(d.min()), float(d.max())
    if hi - lo <= 1e-3 * float(q.max()):  # a flat image (all black included): no cells to tell apart
        return np.zeros(d.shape, bool)
    # Otsu on a 256-bin histogram between the extremes (as skimage bins it), counted in one pass (1 ms
    # less than threshold_otsu's own binning)
    v = d if everywhere else d[in_field]
    if not everywhere:
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            return np.zeros(d.shape, bool)
    idx = ((v - np.float32(lo)) * np.float32(256 / (hi - lo))).astype(np.int32)
    np.clip(idx, 0, 255, out=idx)
    centers = lo + (hi - lo) / 256 * (np.arange(256) + 0.5)
    fg = (d > threshold_otsu(hist=(np.bincount(idx.ravel(), minlength=256), centers))) & in_field
    return fill_holes(open_cross(fg))


def open_cross(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_opening(mask)`` (3x3 cross, one iteration, outside = 0; same result), faster."""
    e = mask.copy()
    e[1:] &= mask[:-1]
    e[:-1] &= mask[1:]
    e[:, 1:] &= mask[:, :-1]
    e[:, :-1] &= mask[:, 1:]
    e[0] = e[-1] = False
    e[:, 0] = e[:, -1] = False
    d = e.copy()
    d[1:] |= e[:-1]
    d[:-1] |= e[1:]
    d[:, 1:] |= e[:, :-1]
    d[:, :-1] |= e[:, 1:]
    return d


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (same result) by labelling the background once: faster."""
    from scipy import ndimage as ndi

    bg, n = ndi.label(~mask)
    outside = np.zeros(n + 1, bool)
    outside[np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]])] = True
    outside[0] = False
    return mask | ((bg > 0) & ~outside[bg])


def estimate_rbc_radius(image: np.ndarray) -> float | None:
    """Median red-cell radius in pixels of ``image`` (HxWx3), or None when none found."""
    from scipy import ndimage as ndi

    rgb_small, step = _downsample(image)
    fg = foreground(rgb_small)
    if fg.sum() < 50:
        return None
    # squared distances to the nearest background pixel are integers (from the feature transform):
    # their histogram gives the percentile exactly
    ft = ndi.distance_transform_edt(fg, return_distances=False, return_indices=True)
    ft[0] -= np.arange(fg.shape[0], dtype=ft.dtype)[:, None]
    ft[1] -= np.arange(fg.shape[1], dtype=ft.dtype)[None, :]
    ft *= ft
    counts = np.bincount((ft[0] + ft[1])[fg])
    # For disks of radius R the pixel distances d obey P(d > t) = (1 - t/R)^2, so the
    # 90th percentile over foreground pixels is 0.684 R: robust to ragged edges.
    return percentile_from_counts(counts, 90, np.sqrt(np.arange(len(counts)))) / 0.684 * step


def _sample_crops(image: np.ndarray, size: int = 1024, grid: int = 3):
    """Full-resolution crops on a grid: large smears are measured where the cells are resolved."""
    h, w = image.shape[:2]
    if max(h, w) <= 1.5 * size:
        return [image]
    ys = np.linspace(0, max(h - size, 0), grid).astype(int)
    xs = np.linspace(0, max(w - size, 0), grid).astype(int)
    return [image[y : y + size, x : x + size] for y in ys for x in xs]


def estimate_diameter(image: np.ndarray, default: float = 50.0) -> float:
    """Expected WBC diameter in pixels of an HxWx3 image (``default`` when unsure).

    Never more than ``MAX_SHARE_OF_SIDE`` of the image's longer side: a cell to be counted fits inside.
    """
    radii = [r for r in (estimate_rbc_radius(c) for c in _sample_crops(image)) if r is not None]
    r = float(np.median(radii)) if radii else None
    d = default if r is None else float(np.clip(2.0 * r * WBC_PER_RBC, MIN_DIAMETER, MAX_DIAMETER))
    return min(d, max(MAX_SHARE_OF_SIDE * max(image.shape[:2]), MIN_DIAMETER))
