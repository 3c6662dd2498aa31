"""White blood cell typing: one small CNN call per segmented cell.

Each cell is seen the same way at any magnification:

1. the image is brought to RGB and normalised from statistics of the whole
   image, so stain and brightness matter less: robust per-channel percentiles
   (as :mod:`.segment` does), or - for cards that say ``"optical density"`` -
   white balance on the background and one exponent for all channels that
   brings the darkest stain to a reference optical density (Beer-Lambert: the
   stains' hues are kept, their strength evened out; :func:`od_parameters`);
2. a square window is cut around the centre of the cell's bounding box, its
   side ``context`` x the cell's equivalent diameter (never less than the
   bounding box plus a pixel each side), padded where it leaves the image, and
   resized to ``input_size`` pixels: a 50 px and a 200 px cell look alike;
3. pixels farther than ``mask_dilation`` crop pixels from the cell are set to
   a neutral background value, so the cell and not its neighbours decides; the
   cell's mask is the fourth input channel;
4. the network gives a softmax over :data:`CLASSES`.

The training script (``benchmarks/train_classifier.py``) uses the same
:func:`cut_window` / :func:`finish_input`, so training and use cannot drift.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
# a type only the user sets (smudge cells, blasts, atypical or unidentifiable cells): never predicted,
# counted on its own and left out of the differential's percentages and of the classifier's examples
OTHER = "other"
CELL_TYPES = [*CLASSES, OTHER]
PROB_COLUMNS = [f"p_{c}" for c in CLASSES]
COLUMNS = ["label", "cell_type", "confidence", *PROB_COLUMNS]


# defaults for cards that do not say (e.g. the tiny test networks)
DEFAULT_CONTEXT = 1.5
DEFAULT_BACKGROUND = 1.0  # normalised value of a bright, empty smear background
DEFAULT_DILATION = 2  # crop pixels kept around the cell mask
MIN_SIDE = 4.0  # smallest window side in image pixels (one-pixel cells still work)


# ------------------------------------------------------------------ per-cell input
def percentages(counts) -> dict:
    """Each type's share (%, to 0.1) of the typed WBCs, for ``counts`` {type: number}: ``other`` has
    none and is not among them; None for every type when no cell is typed (the differential count's
    one rule, for the Classify dock, the batch summary and its report)."""
    n = sum(int(k) for t, k in counts.items() if t != OTHER)
    return {t: (round(100.0 * int(k) / n, 1) if n and t != OTHER else None) for t, k in counts.items()}


def window_side(area: float, bbox_extent: float, context: float) -> float:
    """Window side in image pixels for a cell of ``area`` px and bbox extent (max of height, width)."""
    diameter = float(np.sqrt(4.0 * max(float(area), 1.0) / np.pi))
    return max(context * diameter, float(bbox_extent) + 2.0, MIN_SIDE)


def _bounds(h: int, w: int, cy: float, cx: float, side: float):
    s = max(int(np.ceil(side)), 1)
    y0 = int(np.floor(cy + 0.5 - s / 2.0))
    x0 = int(np.floor(cx + 0.5 - s / 2.0))
    return s, y0, x0, max(y0, 0), max(x0, 0), min(y0 + s, h), min(x0 + s, w)


def _strided(n_img: int, start: int, s: int, step: int) -> tuple[int, int, int]:
    """(window length, first and end window index inside the image) for samples start + i*step."""
    n = -(-s // step)
    i0 = min(n, max(0, -(start // step)))  # the first i with start + i*step >= 0
    i1 = min(n, max(0, (n_img - 1 - start) // step + 1)) if start < n_img else 0
    return n, i0, max(i0, i1)


def cut_window(arr: np.ndarray, cy: float, cx: float, side: float, fill, step: int = 1) -> np.ndarray:
    """The ``ceil(side)`` square of ``arr`` centred at (cy, cx), padded with ``fill`` outside; with
    ``step`` > 1 every ``step``-th pixel of it (a huge cell, e.g. a stray brush stroke across a smear,
    is not cut at full resolution only to be shrunk to the network's input)."""
    s, y0, x0, *_ = _bounds(arr.shape[0], arr.shape[1], cy, cx, side)
    n, i0, i1 = _strided(arr.shape[0], y0, s, step)
    _, j0, j1 = _strided(arr.shape[1], x0, s, step)
    win = np.full((n, n) + arr.shape[2:], fill, dtype=arr.dtype)
    if i1 > i0 and j1 > j0:
        win[i0:i1, j0:j1] = arr[y0 + i0 * step : y0 + (i1 - 1) * step + 1 : step,
                                x0 + j0 * step : x0 + (j1 - 1) * step + 1 : step]
    return win


def inside_window(shape, cy: float, cx: float, side: float, step: int = 1) -> np.ndarray:
    """Which pixels of :func:`cut_window`'s square lie inside an image of ``shape``."""
    s, y0, x0, *_ = _bounds(shape[0], shape[1], cy, cx, side)
    n, i0, i1 = _strided(shape[0], y0, s, step)
    _, j0, j1 = _strided(shape[1], x0, s, step)
    inside = np.zeros((n, n), bool)
    inside[i0:i1, j0:j1] = True
    return inside


def window_step(side: float, size: int) -> int:
    """Sampling step of a cell's window: 1 (every pixel) unless the window is over 4x the network's
    input (512 px for 64): then it is cut at no more than about 4x that size before resizing."""
    return max(1, int(side // (4 * size)))


def resize_square(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of an SxS(xC) float array to size x size (anti-aliased when shrinking)."""
    from skimage.transform import resize

    if x.shape[0] == size and x.shape[1] == size:
        return x.astype(np.float32, copy=False)
    return resize(
        x, (size, size) + x.shape[2:], order=1, preserve_range=True,
        anti_aliasing=x.shape[0] > size, mode="edge",
    ).astype(np.float32)


def finish_input(rgbn: np.ndarray, mask: np.ndarray, *, background: float, dilation: int) -> np.ndarray:
    """4xSxS network input from a normalised SxSx3 crop and its SxS soft cell mask (0..1)."""
    from scipy import ndimage as ndi

    m = mask > 0.5
    if not m.any():  # a cell thinner than the resampling grid: keep its brightest sample
        m = mask >= mask.max() * 0.5 if mask.max() > 0 else m
    keep = ndi.binary_dilation(m, iterations=int(dilation)) if dilation > 0 else m
    out = np.empty((4,) + mask.shape, np.float32)
    out[:3] = np.moveaxis(rgbn, -1, 0)
    out[:3, ~keep] = background
    out[3] = mask
    return out


OPTICAL_DENSITY = "optical density"
OD_BACKGROUND_PERCENTILE = 99.5  # the brightest pixels: the empty slide
OD_DARK_PERCENTILE = 99.5  # of each pixel's optical density summed over RGB: the darkest stain (nuclei)
OD_REFERENCE = 1.2  # what that darkest stain is brought to (summed optical density)


def od_parameters(pixels: np.ndarray, *, background_q: float = OD_BACKGROUND_PERCENTILE,
                  dark_q: float = OD_DARK_PERCENTILE, reference: float = OD_REFERENCE) -> tuple[np.ndarray, float]:
    """``(background, exponent)`` of an image's Nx3 pixels (any scale) for :func:`od_normalise`: the
    background is each channel's ``background_q`` percentile; the exponent scales every optical density
    (-log of the white-balanced value) so that the ``dark_q`` percentile of their sum becomes
    ``reference``: a smear stained twice as dark, or photographed through a yellow filter, gives the
    same input."""
    px = np.asarray(pixels, np.float32).reshape(-1, 3)
    bg = np.percentile(px, background_q, axis=0).astype(np.float32)
    bg = np.maximum(bg, max(float(np.abs(bg).max()), 1e-30) * 1e-3)
    od = -np.log(np.clip(px / bg, 1e-3, 1.0)).sum(1)
    dark = float(np.percentile(od, dark_q))
    return bg, float(np.clip(reference / max(dark, 1e-3), 0.05, 20.0))


def od_normalise(x: np.ndarray, background: np.ndarray, exponent: float) -> np.ndarray:
    """``(x / background) ** exponent`` per channel, float32 in (0, 1]."""
    return np.clip(x.astype(np.float32) / background, 1e-3, 1.0) ** np.float32(exponent)


def image_normaliser(rgb: np.ndarray, norm: dict) -> Callable[[np.ndarray], np.ndarray]:
    """The function ``f(window, at=None)`` that normalises windows of ``rgb`` as a card's
    ``normalisation`` (see :func:`input_settings`) asks, from statistics of the whole image. Under
    uneven light (:func:`.scale.shading`) a window centred ``at`` (y, x) is first brought to the
    light of the image's brightest part, as :func:`~.segment.segment` sees it."""
    from .scale import field_of_view
    from .segment import channel_ranges, light_window, normalise, unshade

    outside, light = field_of_view(rgb)
    h, w = rgb.shape[:2]

    def even(x, at):  # as unshade() brings the segmenter's windows to even light (integers clipped alike)
        if light is None or at is None:
            return x
        level = light_window(light, (int(round(at[0])), int(round(at[1]))), (1, 1), (h, w))[0, 0]
        y = x.astype(np.float32) * (np.float32(1) / level)
        return np.minimum(y, np.iinfo(x.dtype).max) if x.dtype.kind in "ui" else y

    if norm.get("method") == OPTICAL_DENSITY:
        step = max(1, int(np.sqrt(h * w / 1e6)))  # ~1 Mpx strided, as channel_ranges
        sub = rgb[::step, ::step]
        if light is not None:
            sub = unshade(sub, light, (0, 0), sub.shape[:2])
        bg, k = od_parameters(sub, background_q=norm["background_percentile"],
                              dark_q=norm["dark_percentile"], reference=norm["reference"])
        return lambda x, at=None: od_normalise(even(x, at), bg, k)
    # of the smear, as segment()'s
    ranges = channel_ranges(rgb, norm["low"], norm["high"], outside=outside, shading=light)
    return lambda x, at=None: normalise(even(x, at), ranges)


def cell_input(rgb, norm, labels, label_id, sl, area, *, size, context, background, dilation):
    """The network input (4 x size x size float32) of one cell of an HxWx3 image; ``norm``: the
    image's :func:`image_normaliser`, or its per-channel ``ranges`` (:func:`~.segment.channel_ranges`)."""
    if not callable(norm):
        from .segment import normalise

        ranges = norm
        norm = lambda x, at=None: normalise(x, ranges)  # noqa: E731

    extent = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
    cy = (sl[0].start + sl[0].stop - 1) / 2.0
    cx = (sl[1].start + sl[1].stop - 1) / 2.0
    side = window_side(area, extent, context)
    step = window_step(side, size)
    x = norm(cut_window(rgb, cy, cx, side, 0, step), (cy, cx))  # any dtype: cast per window only
    x[~inside_window(rgb.shape, cy, cx, side, step)] = background
    m = (cut_window(labels, cy, cx, side, 0, step) == label_id).astype(np.float32)
    return finish_input(resize_square(x, size), resize_square(m, size), background=background, dilation=dilation)


def input_settings(card: dict) -> tuple[dict, dict]:
    """How a classifier card wants its cells cut: (:func:`cell_input` keywords, normalisation for
    :func:`image_normaliser`: per-channel percentiles ``low``/``high``, or the optical-density settings)."""
    card_norm = card.get("normalisation", {}) or {}
    if card_norm.get("method") == OPTICAL_DENSITY:
        norm = {"method": OPTICAL_DENSITY,
                "background_percentile": float(card_norm.get("background_percentile", OD_BACKGROUND_PERCENTILE)),
                "dark_percentile": float(card_norm.get("dark_percentile", OD_DARK_PERCENTILE)),
                "reference": float(card_norm.get("reference", OD_REFERENCE))}
    else:
        norm = {"low": float(card_norm.get("low", 0.5)), "high": float(card_norm.get("high", 99.5))}
    settings = {
        "size": int(card.get("input_size", 64)),
        "context": float(card.get("context", DEFAULT_CONTEXT)),
        "background": float(card.get("background_value", DEFAULT_BACKGROUND)),
        "dilation": int(card.get("mask_dilation", DEFAULT_DILATION)),
    }
    return settings, norm


# ------------------------------------------------------------------ labels
def _check_labels(labels, shape) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise ValueError(f"labels shape {labels.shape} does not match the image shape {tuple(shape)} (H, W)")
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise ValueError("labels must hold whole numbers (0 background, 1..N cells)")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "ui":
        raise ValueError(f"labels dtype {labels.dtype} is not supported; expected integers")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative (0 background, 1..N cells)")
    if labels.dtype == np.uint64 and labels.size and labels.max() >= 2**63:
        raise ValueError(f"label id {int(labels.max())} is too large; expected ids below 2**63")
    return labels


def _regions(labels: np.ndarray, ids) -> tuple[np.ndarray, list, np.ndarray]:
    """(ids, bbox slices, areas) of the wanted cells, ids sorted."""
    from scipy import ndimage as ndi

    from .segment import label_areas

    present, counts = label_areas(labels)
    if ids is None:
        want = present
    else:
        asked = np.asarray(list(ids) if not np.isscalar(ids) else [ids])
        if asked.size and (asked.dtype.kind not in "uif" or asked.dtype == bool
                           or (asked.dtype.kind == "f" and not np.all(np.mod(asked, 1) == 0))):
            raise ValueError(f"ids must be integer label ids, got {list(asked[:10])!r}")
        want = np.unique(asked.astype(np.int64))
        missing = want[~np.isin(want, present)]
        if len(missing):
            shown = ", ".join(str(int(i)) for i in missing[:10])
            raise ValueError(f"label id(s) {shown} are not present in labels (0 is background)")
    if len(want) == 0:
        return want.astype(np.int64), [], np.zeros(0)
    areas = counts[np.searchsorted(present, want)].astype(np.float64)
    if int(present[-1]) <= 4 * len(present) + 65536:  # compact enough for find_objects
        objs = ndi.find_objects(labels)
        slices = [objs[int(i) - 1] for i in want]
    else:  # huge sparse ids: compact them first
        inv = np.searchsorted(present, labels)  # 0.. for present ids, 0 also for background
        compact = np.where(labels > 0, inv + 1, 0)
        objs = ndi.find_objects(compact)
        slices = [objs[int(np.searchsorted(present, i))] for i in want]
    return want.astype(np.int64), slices, areas


def empty_table():
    import pandas as pd

    cols = {"label": pd.Series(dtype=np.int64), "cell_type": pd.Series(dtype=object)}
    cols["confidence"] = pd.Series(dtype=np.float32)
    for c in PROB_COLUMNS:
        cols[c] = pd.Series(dtype=np.float32)
    return pd.DataFrame(cols)


def _table(ids, probs, classes):
    import pandas as pd

    if len(ids) == 0:
        return empty_table()
    probs = np.asarray(probs, np.float32)
    full = np.zeros((len(ids), len(CLASSES)), np.float32)
    for j, c in enumerate(classes):
        full[:, CLASSES.index(c)] = probs[:, j]
    best = full.argmax(1)
    df = pd.DataFrame({"label": np.asarray(ids, np.int64)})
    df["cell_type"] = pd.Series([CLASSES[i] for i in best], dtype=object)
    df["confidence"] = full.max(1)
    for j, c in enumerate(PROB_COLUMNS):
        df[c] = full[:, j]
    return df


# ------------------------------------------------------------------ inference
def iter_classify(image, labels, *, model=None, device=None, ids=None, batch_size: int = 64) -> Iterator:
    """The work of :func:`classify` as a generator, for progress and cancel.

    Yields ``("progress", done, total)`` per batch (first ``("progress", 0, total)``);
    the last item is ``("table", DataFrame)``. Closing the generator between
    items stops the work.
    """
    from .segment import check_image

    rgb = check_image(image)
    labels = _check_labels(labels, rgb.shape[:2])
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of cells, at least 1, got {batch_size!r}")
    want, slices, areas = _regions(labels, ids)
    from .device import resolve_device
    from .models import forward_pass, load_model, read_card, resolve_model_path

    dev = resolve_device(device)  # a bad device or model file is reported even when there is no cell
    if len(want) == 0:
        if not isinstance(model, tuple):  # (with cells, loading the model checks it)
            read_card(resolve_model_path(model, "classifier"), "classifier")
        yield ("progress", 0, 0)
        yield ("table", empty_table())
        return
    total = int(np.ceil(len(want) / batch_size))
    yield ("progress", 0, total)

    import torch

    if isinstance(model, tuple):  # an already loaded (network, card), as training uses
        net, card = model
    else:
        net, card = load_model(model, "classifier", dev)
    classes = list(card.get("classes", CLASSES))
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"model classes {unknown} are not known cell types ({', '.join(CLASSES)})")
    settings, norm_spec = input_settings(card)
    norm = image_normaliser(rgb, norm_spec)
    use_amp = dev.type == "cuda"
    probs = []
    for b, b0 in enumerate(range(0, len(want), batch_size)):
        batch = np.stack([
            cell_input(rgb, norm, labels, int(want[i]), slices[i], areas[i], **settings)
            for i in range(b0, min(b0 + batch_size, len(want)))
        ])
        with torch.inference_mode(), forward_pass():
            x = torch.from_numpy(batch).to(dev)
            if use_amp:
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = net(x)
            else:
                logits = net(x)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        yield ("progress", b + 1, total)
    yield ("table", _table(want, np.concatenate(probs), classes))


def classify(image, labels, *, model=None, device=None, ids=None, batch_size: int = 64,
             progress: Callable | None = None):
    """Type every labelled white blood cell of an image.

    Parameters
    ----------
    image : HxW or HxWx3/4 array, uint8/uint16/float (the smear the labels belong to).
    labels : HxW integer labels, 0 background, one id per cell (e.g. from :func:`segment`).
    model : None for the shipped classifier, a ``.safetensors`` path with its JSON card,
        or an already loaded ``(network, card)``.
    device : None/"auto" (cuda, then mps, then cpu) or a torch device string.
    ids : optional label ids to classify (default: every id present); each must be present.
    progress : optional callable ``(done_batches, total_batches)``.

    Returns
    -------
    pandas.DataFrame, one row per cell sorted by label, with columns ``label``,
    ``cell_type`` (one of :data:`CLASSES`), ``confidence`` (the highest probability)
    and ``p_<class>`` for each class (they sum to 1).
    """
    table = None
    for item in iter_classify(image, labels, model=model, device=device, ids=ids, batch_size=batch_size):
        if item[0] == "progress" and progress is not None:
            progress(item[1], item[2])
        elif item[0] == "table":
            table = item[1]
    return table


def classify_labels(image, labels, ids, **kwargs):
    """:func:`classify` restricted to ``ids`` (e.g. the cells added since the last run)."""
    return classify(image, labels, ids=ids, **kwargs)
