"""Training machinery shared by the shipped-model script and :func:`finetune`.

Samples are (image, instance labels[, weight map]) at native resolution. Each
training crop is cut around a random point (mostly on a cell), rescaled so a
WBC is ``target_diameter`` px across (with scale jitter), colour-augmented
(hue, saturation, gains, gamma, grey, blur, noise) and normalised the same way
as at inference. Targets: foreground and per-cell normalised distance.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

SEGMENTER_ARCH = {
    "name": "Unet",
    "encoder_name": "tu-mobilenetv3_small_100",
    "encoder_depth": 4,
    "decoder_channels": [64, 32, 24, 16],
    "in_channels": 3,
    "classes": 2,
}
TARGET_DIAMETER = 32.0


@dataclass
class Sample:
    rgb: np.ndarray  # HxWx3 float32 in 0..1
    labels: np.ndarray  # HxW int32 instances (0 = background)
    diameter: float  # WBC diameter in px
    weight: np.ndarray | None = None  # HxW float32 loss weight (0 = ignore), None = all ones
    name: str = ""
    centres: np.ndarray = field(default=None)  # Nx2 cell centroids
    probe: np.ndarray = field(default=None)  # Kx3 pixel subsample for normalisation
    empty: np.ndarray = field(default=None)  # Kx2 background points far from any cell (see with_empty_points)


def cell_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent diameter of the labelled cells (None when none)."""
    from .segment import label_areas

    areas = label_areas(np.asarray(labels))[1]
    if len(areas) == 0:
        return None
    return float(np.sqrt(4 * np.median(areas) / np.pi))


def cell_centres(labels: np.ndarray) -> np.ndarray:
    """Nx2 centroids (row, column) of the cells of ``labels``, in id order (from the cell table,
    cell by cell: ``ndi.center_of_mass`` over the whole image made full-size float64 grids, 13 s on
    225 Mpx)."""
    from .segment import cell_table

    return cell_table(labels)[["centroid-0", "centroid-1"]].to_numpy(np.float64).reshape(-1, 2)


def make_sample(image, labels, *, diameter=None, weight=None, name="") -> Sample:
    from .scale import shading
    from .segment import check_image, unshade_image

    rgb = check_image(image)
    light = shading(rgb)
    if light is not None:  # as segment() and classify() see it: under even light
        rgb = unshade_image(rgb, light)
    if rgb.dtype == np.uint8:
        rgb = rgb.astype(np.float32) / 255.0
    elif rgb.dtype.kind == "u":  # by the image's top, not the dtype's: 12-bit data in uint16 is 0..4095
        rgb = rgb.astype(np.float32) / max(float(rgb.max()), 1.0)
    else:  # float: training's colour augmentation works on 0..1, so other ranges (0..255, 0..4095) go there
        rgb = rgb.astype(np.float32, copy=False)  # (a float32 image in range, e.g. a hold-out strip: no copy)
        lo, hi = min(float(rgb.min()), 0.0), float(rgb.max())
        if hi > 1.0 or lo < 0.0:
            rgb = (rgb - lo) / max(hi - lo, 1e-6)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match image shape {rgb.shape[:2]} ({name})")
    labels = labels.astype(np.int32, copy=False)
    if diameter is None:
        diameter = cell_diameter(labels)
    if diameter is None:
        raise ValueError(f"sample {name!r} has no labelled cell and no diameter")
    centres = cell_centres(labels)
    rng = np.random.default_rng(0)
    flat = rgb.reshape(-1, 3)
    probe = flat[rng.integers(0, len(flat), size=min(len(flat), 8192))]
    return Sample(rgb, labels, float(diameter), weight, name, centres, probe)


def rescaled(sample: Sample, target: float) -> Sample:
    """The sample resized once so a WBC is ``target`` px across (crops then need only small resizes)."""
    from skimage.transform import resize

    f = target / sample.diameter
    if 0.9 < f < 1.1:
        return sample
    h, w = sample.labels.shape
    shape = (max(int(round(h * f)), 8), max(int(round(w * f)), 8))
    rgb = resize(sample.rgb, shape, order=1, anti_aliasing=f < 1, preserve_range=True).astype(np.float32)
    lab = resize(sample.labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    wgt = None
    if sample.weight is not None:
        wgt = resize(sample.weight, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.float32)
    fy, fx = shape[0] / h, shape[1] / w
    centres = sample.centres * np.array([fy, fx]) if len(sample.centres) else sample.centres
    return Sample(rgb, lab, sample.diameter * (fy + fx) / 2, wgt, sample.name, centres, sample.probe)


def with_empty_points(sample: Sample, *, min_distance: float = 0.75, max_points: int = 2000) -> Sample:
    """The sample with ``empty`` set: background points at least ``min_distance`` WBC diameters
    from any labelled cell and from ignored areas (red cells, platelets and smear background only)."""
    from dataclasses import replace

    from scipy import ndimage as ndi

    clear = sample.labels == 0
    if sample.weight is not None:
        clear &= sample.weight > 0
    far = ndi.distance_transform_edt(clear) >= min_distance * sample.diameter
    pts = np.argwhere(far)
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(0).choice(len(pts), max_points, replace=False)]
    return replace(sample, empty=pts.astype(np.float32))


def field_probe(rgb: np.ndarray, cy: float, cx: float, side: float, rng, n: int = 8192) -> np.ndarray | None:
    """Pixels (Kx3) of a ``side`` x ``side`` field that holds (cy, cx) at a random place, cut to the image.

    Normalising a training crop on such a field instead of the whole image shows the network
    fields of every make-up, as users open them: one cell filling the image, a crowded smear, or
    red cells only (which a contrast stretch of the field alone makes darker than they are).
    None when less than 8 x 8 pixels of the field lie in the image.
    """
    h, w = rgb.shape[:2]
    y0 = int(round(cy - side * rng.uniform(0.2, 0.8)))
    x0 = int(round(cx - side * rng.uniform(0.2, 0.8)))
    s = int(round(side))
    ya, yb, xa, xb = max(y0, 0), min(y0 + s, h), max(x0, 0), min(x0 + s, w)
    if yb - ya < 8 or xb - xa < 8:
        return None
    return _field_pixels(rgb, ya, yb, xa, xb, n)


def _field_pixels(rgb: np.ndarray, ya: int, yb: int, xa: int, xb: int, n: int = 8192) -> np.ndarray:
    """About ``n`` pixels (Kx3) of ``rgb[ya:yb, xa:xb]`` on a regular grid (for its percentiles)."""
    step = max(1, int(math.sqrt((yb - ya) * (xb - xa) / n)))
    return rgb[ya:yb:step, xa:xb:step].reshape(-1, 3)


def small_field_window(rgb: np.ndarray, cy: float, cx: float, src: float, crop: int, rng):
    """A small image inside a training crop: (its pixels Kx3, CxC mask of where it lies in the crop).

    The crop is ``src`` source pixels wide, centred on (cy, cx), resized to ``crop``. The image is a
    field 0.35-1 crop wide that holds (cy, cx) at a random place, cut to the source image: 1-3 WBC
    diameters, as a user's crop around one cell, or around red cells only. segment() sees such an
    image in one window, normalised on itself, with bright padding around it. None when the source
    image's edge cuts the field below 0.3 crop (a WBC diameter) on a side.
    """
    h, w = rgb.shape[:2]
    side = src * rng.uniform(0.35, 1.0)
    y0, x0 = cy - side * rng.uniform(0.2, 0.8), cx - side * rng.uniform(0.2, 0.8)
    ya, yb = max(int(round(y0)), 0), min(int(round(y0 + side)), h)
    xa, xb = max(int(round(x0)), 0), min(int(round(x0 + side)), w)
    f = crop / src  # source px -> crop px
    if min(yb - ya, xb - xa) * f < 0.3 * crop:
        return None
    c0y, c0x = cy - src / 2, cx - src / 2
    inside = np.zeros((crop, crop), bool)
    inside[max(int(round((ya - c0y) * f)), 0) : max(int(round((yb - c0y) * f)), 0),
           max(int(round((xa - c0x) * f)), 0) : max(int(round((xb - c0x) * f)), 0)] = True
    return _field_pixels(rgb, ya, yb, xa, xb), inside


# ---------------------------------------------------------------- augmentation
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_INV = np.linalg.inv(_YIQ).astype(np.float32)


def colour_transform(rng: np.random.Generator, strength: float = 1.0, wide_hue: float = 0.0, stain: float = 0.0,
                     stain_share: float = 1.0, grey: float = 0.1):
    """A random colour change f(pixels Nx3 in 0..1) -> Nx3 (stain/scanner variation).

    With probability ``wide_hue`` the hue turns by any angle (stains of other labs can
    differ by far more than the usual +-20 degrees: lilac vs orange-brown cytoplasm).
    ``stain`` > 0 first scales each stain's optical density by up to +-``stain`` (and shifts
    it by a fifth of that): colour deconvolution jitter, which changes the dyes' balance
    rather than every hue at once; it is applied to a ``stain_share`` of the calls.
    ``grey``: chance (times ``strength``) that the result is turned to grey, as a greyscale camera sees it.
    """
    theta = rng.uniform(-0.35, 0.35) * strength
    if wide_hue > 0 and rng.random() < wide_hue:
        theta = rng.uniform(-math.pi, math.pi)
    sat = math.exp(rng.uniform(-0.5, 0.4) * strength)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[1, 0, 0], [0, c * sat, -s * sat], [0, s * sat, c * sat]], np.float32)
    m = _YIQ_INV @ rot @ _YIQ
    gains = np.exp(rng.uniform(-0.15, 0.15, 3) * strength).astype(np.float32)
    gamma = math.exp(rng.uniform(-0.35, 0.35) * strength)
    to_grey = rng.random() < grey * strength
    od_gain = od_bias = None
    if stain > 0 and (stain_share >= 1 or rng.random() < stain_share):
        od_gain = rng.uniform(1 - stain, 1 + stain, 3).astype(np.float32)
        od_bias = rng.uniform(-stain / 5, stain / 5, 3).astype(np.float32)

    def f(x):
        if od_gain is not None:
            from skimage.color import hed2rgb, rgb2hed

            x = np.clip(hed2rgb(rgb2hed(x) * od_gain + od_bias), 0, 1).astype(np.float32)
        y = np.clip(x @ m.T, 0, 1) * gains
        y = np.clip(y, 0, 1) ** gamma
        if to_grey:
            y = np.repeat(y @ _YIQ[0:1].T, 3, axis=-1)
        return y.astype(np.float32)

    return f


def _crop_rescaled(arr, cy, cx, src, out, order, cval):
    """Cut a ``src``x``src`` window centred at (cy, cx) (padding with cval) and resize to out x out."""
    from skimage.transform import resize

    h, w = arr.shape[:2]
    y0, x0 = int(round(cy - src / 2)), int(round(cx - src / 2))
    s = int(round(src))
    shape = (s, s) + arr.shape[2:]
    win = np.full(shape, cval, dtype=arr.dtype)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y0 + s, h), min(x0 + s, w)
    if sy1 > sy0 and sx1 > sx0:
        win[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    if s == out:
        return win
    return resize(win, (out, out) + arr.shape[2:], order=order, preserve_range=True, anti_aliasing=(order > 0 and s > 1.5 * out), mode="edge").astype(arr.dtype)


def beyond_edge(shape, cy, cx, src, out) -> np.ndarray:
    """Where a crop of an image of ``shape`` made by :func:`_crop_rescaled` (linear) holds anything from
    beyond the image's edge: the fill and the pixels the resize blended with it (left in, they made a dark
    line where a crop ran past its image; segment() shows beyond an image's edge as bright background)."""
    inside = _crop_rescaled(np.broadcast_to(np.float32(1.0), tuple(shape)), cy, cx, src, out, 1, 0.0)
    return inside < 0.999


def prepare_sample(sample: Sample, target: float, empty_share: float = 0.0) -> Sample:
    """A training sample as :func:`train_segmenter` draws crops from it: at the network's scale
    (:func:`rescaled`), with red-cell-only points (:func:`with_empty_points`) when crops are centred there."""
    s = rescaled(sample, target)
    return with_empty_points(s) if empty_share > 0 else s


def red_cell_layer(layer: Sample, scale: float, crop: int, rng) -> np.ndarray:
    """Light let through one more layer of red cells (CxCx3 in 0..1): a field of ``layer`` without
    WBCs (one of its ``empty`` points, its cells and ignored parts turned to its background), cut at
    ``scale`` (crop px per source px, so its red cells match a crop made at that scale), turned and
    mirrored at random, and divided by its background colour (Beer-Lambert: a pixel's light is
    multiplied by what each layer lets through). A thick smear, red cells lying on each other."""
    from scipy import ndimage as ndi

    src = crop / scale
    ly, lx = layer.empty[rng.integers(len(layer.empty))]
    rgb = _crop_rescaled(layer.rgb, ly, lx, src, crop, 1, -1.0)
    bg = np.maximum(np.percentile(layer.probe, 95, axis=0), 1e-3).astype(np.float32)
    hide = _crop_rescaled(layer.labels, ly, lx, src, crop, 0, 0) > 0
    if layer.weight is not None:
        hide |= _crop_rescaled(layer.weight, ly, lx, src, crop, 0, 0.0) <= 0
    hide |= beyond_edge(layer.rgb.shape[:2], ly, lx, src, crop)  # beyond the layer image's edge: nothing there
    rgb[ndi.binary_dilation(hide, iterations=2)] = bg
    through = np.clip(rgb / bg, 0.0, 1.0)
    through = np.rot90(through, rng.integers(4), axes=(0, 1))
    return np.ascontiguousarray(through[:, ::-1] if rng.random() < 0.5 else through)


def distance_target(labels: np.ndarray) -> np.ndarray:
    """Per-cell Euclidean distance to the cell edge, divided by that cell's maximum (0..1)."""
    from scipy import ndimage as ndi

    out = np.zeros(labels.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        m = labels[sl] == i
        d = ndi.distance_transform_edt(m)
        if d.max() > 0:
            out[sl][m] = (d / d.max())[m]
    return out


def random_crop(sample: Sample, rng, *, crop: int = 96, target: float = TARGET_DIAMETER, jitter: float = 0.3, colour: float = 1.0,
                wide_hue: float = 0.0, stain: float = 0.0, stain_share: float = 1.0, stain_weak: bool = True,
                field_norm: float = 0.0, empty_share: float = 0.0, small_field: float = 0.0, grey: float = 0.1,
                layers: tuple = ()):
    """One augmented training example: (x 3xCxC float32, fg CxC, dist CxC, weight CxC).

    ``stain_weak=False``: no stain jitter on weakly labelled samples (those with a ``weight`` map).
    ``field_norm``: share of crops normalised on a random field around them (:func:`field_probe`,
    0.75-4 crops wide) instead of the whole image. ``empty_share``: share of crops, among samples
    with ``empty`` points, centred on such a point (red cells only) and normalised on a field
    1-2 crops wide around it: the fields without any WBC that a smear is mostly made of.
    ``small_field``: share of crops that show a small image as a user may open it (:func:`small_field_window`):
    only a field 0.35-1 crop wide holds the image, normalised on itself; around it the crop is
    padded as segment() pads a small image. With ``empty_share``, such a field may hold red cells only.
    ``grey``: share of crops turned to grey (:func:`colour_transform`).
    ``layers``: samples (with ``empty`` points) whose red cells are laid over this crop
    (:func:`red_cell_layer`, one each, at this crop's scale): a thick smear.
    """
    from scipy import ndimage as ndi

    from .segment import normalise

    scale = target / sample.diameter * math.exp(rng.uniform(-jitter, jitter))
    src = crop / scale
    h, w = sample.labels.shape
    empty = empty_share > 0 and sample.empty is not None and len(sample.empty) > 0 and rng.random() < empty_share
    if empty:
        cy, cx = sample.empty[rng.integers(len(sample.empty))]
    elif len(sample.centres) and rng.random() < 0.7:
        cy, cx = sample.centres[rng.integers(len(sample.centres))]
        cy += rng.uniform(-0.5, 0.5) * src * 0.6
        cx += rng.uniform(-0.5, 0.5) * src * 0.6
    else:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    if sample.weight is not None and not stain_weak:
        stain = 0.0
    f = colour_transform(rng, colour, wide_hue, stain, stain_share, grey)
    rgb = _crop_rescaled(sample.rgb, cy, cx, src, crop, 1, -1.0)
    outside = beyond_edge((h, w), cy, cx, src, crop)  # (shown bright below, as segment() pads)
    through = None
    for layer in layers:
        t = red_cell_layer(layer, scale * sample.diameter / layer.diameter, crop, rng)  # red cells alike in size
        through = t if through is None else through * t
    if through is not None:
        rgb = np.where(outside[..., None], rgb, np.clip(rgb, 0, 1) * through)
    x = f(np.clip(rgb, 0, 1).reshape(-1, 3)).reshape(rgb.shape)
    pixels = None
    small = small_field_window(sample.rgb, cy, cx, src, crop, rng) if small_field > 0 and rng.random() < small_field else None
    if small is not None:
        pixels, inside = small
        outside |= ~inside
    elif empty:
        pixels = field_probe(sample.rgb, cy, cx, src * math.exp(rng.uniform(0.0, math.log(2.0))), rng)
    elif field_norm > 0 and rng.random() < field_norm:
        pixels = field_probe(sample.rgb, cy, cx, src * math.exp(rng.uniform(math.log(0.75), math.log(4.0))), rng)
    pixels = sample.probe if pixels is None else pixels
    if through is not None:  # the field it is normalised on lies under the same layers
        pixels = pixels * through.reshape(-1, 3)[rng.integers(0, crop * crop, len(pixels))]
    probe = f(pixels)
    lo, hi = np.percentile(probe, [0.5, 99.5], axis=0)
    x = normalise(x, np.stack([lo, np.maximum(hi, lo + 1e-3)]))
    x[outside] = 1.0
    if rng.random() < 0.2:
        x = ndi.gaussian_filter(x, (rng.uniform(0.3, 1.2),) * 2 + (0,))
    if rng.random() < 0.3:
        x = x + rng.normal(0, rng.uniform(0.01, 0.05), x.shape).astype(np.float32)
    lab = _crop_rescaled(sample.labels, cy, cx, src, crop, 0, 0)
    if small is not None:
        lab[outside] = 0  # cells cut by the small image's edge end there, as at any image edge
    wgt = np.ones((crop, crop), np.float32) if sample.weight is None else _crop_rescaled(sample.weight, cy, cx, src, crop, 0, 0.0)
    wgt[outside] = 0.0
    # geometric: flips and 90-degree turns
    k = rng.integers(4)
    flip = rng.random() < 0.5
    def geo(a):
        a = np.rot90(a, k, axes=(0, 1))
        return np.ascontiguousarray(a[:, ::-1] if flip else a)
    x, lab, wgt = geo(x), geo(lab), geo(wgt)
    from skimage.segmentation import relabel_sequential

    lab = relabel_sequential(lab)[0]
    return np.moveaxis(x, -1, 0).astype(np.float32), (lab > 0).astype(np.float32), distance_target(lab), wgt


def make_batch(samples, rng, n, *, overlap: float = 0.0, **kw):
    """``n`` training crops of random samples; ``overlap``: share of crops laid under one or two more
    layers of red cells from other samples (those with ``empty`` points), as in a thick smear."""
    import torch

    sources = [s for s in samples if s.empty is not None and len(s.empty)] if overlap > 0 else []
    items = []
    for _ in range(n):
        sample = samples[rng.integers(len(samples))]
        layers = ()
        if sources and rng.random() < overlap:
            layers = tuple(sources[rng.integers(len(sources))] for _ in range(rng.integers(1, 3)))
        items.append(random_crop(sample, rng, layers=layers, **kw))
    return [torch.from_numpy(np.stack(z)) for z in zip(*items)]


def seg_loss(out, fg, dist, wgt):
    import torch.nn.functional as F

    logit_fg, logit_d = out[:, 0], out[:, 1]
    bce = (F.binary_cross_entropy_with_logits(logit_fg, fg, reduction="none") * wgt).sum() / wgt.sum().clamp(min=1)
    p = logit_fg.sigmoid() * wgt
    dice = 1 - (2 * (p * fg).sum() + 1) / (p.sum() + (fg * wgt).sum() + 1)
    wd = wgt * (fg + 0.1)
    dl = (F.binary_cross_entropy_with_logits(logit_d, dist, reduction="none") * wd).sum() / wd.sum().clamp(min=1)
    return bce + dice + dl


class Stopped(Exception):
    """``should_stop`` said so during :func:`evaluate`."""


def evaluate(net, card, samples, device, should_stop=None) -> dict:
    """Segment each validation sample (at its known diameter) and score it. ``should_stop`` is
    asked at every tile (a big hold-out takes seconds): :class:`Stopped` when it says so."""
    from .metrics import match_instances, summarise
    from .segment import iter_segment

    was_training = net.training
    net.eval()
    res = []
    for s in samples:
        labels = None
        for item in iter_segment(s.rgb, model=(net, card), device=device, diameter=s.diameter):
            if should_stop is not None and should_stop():
                if was_training:
                    net.train()
                raise Stopped
            if item[0] == "labels":
                labels = item[1]
        if s.weight is not None:  # ignore predictions that fall in ignored areas
            keep = np.unique(labels[(labels > 0) & (s.weight > 0)])
            labels = np.where(np.isin(labels, keep), labels, 0)
        res.append(match_instances(s.labels, labels))
    if was_training:
        net.train()
    return summarise(res)


def train_segmenter(
    net,
    card: dict,
    train: list[Sample],
    val: list[Sample],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    eval_every: int = 200,
    device="cpu",
    seed: int = 0,
    crop: int = 96,
    wide_hue: float = 0.0,
    stain: float = 0.0,
    stain_share: float = 1.0,
    stain_weak: bool = True,
    field_norm: float = 0.0,
    empty_share: float = 0.0,
    small_field: float = 0.0,
    ema: float = 0.0,
    grey: float = 0.1,
    overlap: float = 0.0,
    progress=None,
    should_stop=None,
    baseline: dict | None = None,
    log=print,
):
    """Train ``net`` in place; keep and return the best state by validation matched Dice x F1.

    Returns ``(best_state or None, history)``: ``best_state`` is None when no
    evaluation beat the score before training (``baseline``: that evaluation, when the caller
    made it already). ``should_stop``: asked at every step and evaluation tile; training then
    ends early (the caller decides what that means).
    ``ema``: when > 0, evaluate and keep an exponential moving average of the weights (and batch-norm
    statistics) with this decay per step instead of the raw weights: less dependent on the last steps' batches.
    ``overlap``: share of training crops under more layers of red cells (:func:`make_batch`).
    """
    import copy

    import torch

    from .device import resolve_device
    from .models import forward_pass

    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.to(dev)
    target = float(card.get("target_diameter", TARGET_DIAMETER))
    prepared = []
    for s in train:  # tens of seconds each on a big smear: a cancel is honoured between them
        if should_stop is not None and should_stop():
            return None, []
        prepared.append(prepare_sample(s, target, empty_share))
    train = prepared
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    averaged = None
    if ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    history = []

    def score(m):
        return m["matched_dice"] * m["f1"]

    try:
        base = baseline if baseline is not None or not val else evaluate(net, card, val, dev, should_stop)
    except Stopped:
        return None, history
    best_score = score(base) if base else -1.0
    best_state = None
    history.append({"step": 0, **(base or {})})
    t0 = time.time()
    net.train()
    running = []
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            break
        x, fg, dist, wgt = (t.to(dev) for t in make_batch(train, rng, batch_size, crop=crop, target=target, wide_hue=wide_hue, stain=stain,
                                                             stain_share=stain_share, stain_weak=stain_weak,
                                                             field_norm=field_norm, empty_share=empty_share,
                                                             small_field=small_field, grey=grey, overlap=overlap))
        with forward_pass():
            out = net(x)
            loss = seg_loss(out, fg, dist, wgt)
            opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if averaged is not None:
            averaged.update_parameters(net)
        running.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            judged = net if averaged is None else averaged.module
            try:
                m = evaluate(judged, card, val, dev, should_stop) if val else {"matched_dice": None, "f1": None}
            except Stopped:
                break
            rec = {"step": step, "loss": float(np.mean(running)), "time_s": time.time() - t0, **m}
            history.append(rec)
            running = []
            improved = not val or score(m) > best_score  # no hold-out: nothing to judge by, the latest weights
            if improved:
                best_score = score(m) if val else best_score
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in judged.state_dict().items()})
            figures = f"val dice {m['matched_dice']:.4f} f1 {m['f1']:.4f}" if val else "no hold-out"
            log(f"step {step}/{steps} loss {rec['loss']:.4f} {figures} {'*' if improved else ''} ({rec['time_s']:.0f}s)")
            if progress is not None:
                progress(step, steps, rec)
    net.eval()
    return best_state, history
