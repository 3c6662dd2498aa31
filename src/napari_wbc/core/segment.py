"""WBC instance segmentation: U-Net probability maps, tiled, then watershed.

Pipeline (all Qt-free):
1. check the input and bring it to RGB float with robust per-channel
   percentile normalisation (stain/brightness invariance);
2. rescale so a WBC is ``card["target_diameter"]`` pixels across (``diameter``
   given, or estimated from the red cells; an estimate is then checked against
   the size of the cells found, and tried 1.5x smaller once when none is found);
3. run the network over overlapping tiles whose centres are kept (no blending
   buffers: memory stays bounded), batched, mixed precision on GPU;
4. split touching cells with a watershed on the predicted normalised distance
   map, drop objects far smaller than a WBC (platelets, debris) and those lying
   mostly outside the microscope's field (black vignetting);
5. bring each cell back to the input's resolution from the upsampled
   probability map, so outlines are smooth at any scale.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .scale import percentile_from_counts

PROB_THRESHOLD = 0.5
SEED_THRESHOLD = 0.5
MIN_AREA_FRACTION = 0.2  # of the area of a disk of the expected WBC diameter
# with diameter=None: re-run at a corrected scale when the cells found are off the
# network's working size by more than this factor (at most REFINE_PASSES extra runs)
REFINE_TOLERANCE = 0.2
REFINE_PASSES = 1
REFINE_CLAMP = (0.7, 1.4)  # a correction never moves the red-cell estimate further than this
# with diameter=None and no cell found: look again as if the cells were this much smaller. On tight
# single-cell crops the WBC itself, not the red cells, dominates the estimate (about 1.5x too large
# on Tecom crops), and an unfamiliar stain then gives nothing at the first scale.
FALLBACK_FACTORS = (1 / 1.5,)
DIAMETER_LIMITS = (8.0, 1000.0)  # px; the corrections never leave this range
MIN_DIAMETER_ARG = 4.0  # px; a given diameter below this would blow the image up past any use (and memory)
# with diameter=None: when every cell found lies in one cluster CLUSTER_GROWTH[0]-[1] cells wide and
# under RED_CELL_SHARE of the image's other objects (red cells) lie outside it, the estimate had no
# red cells to go by: look once more at the scale that makes the cluster one cell, keep that if it is one
CLUSTER_GROWTH = (1.3, 2.5)
RED_CELL_SHARE = 0.25
# ... and when one cell was found covering under BODY_SHARE of the stained region it lies in, with more
# nucleus-dark pixels beside it (a lobe of a cell seen too large), look at the scale that makes the region
# one cell (growth BODY_GROWTH_MIN to CLUSTER_GROWTH[1]); keep that if it finds one cell BODY_GAIN times
# the first's area
BODY_SHARE = 0.7
BODY_GROWTH_MIN = 1.2
BODY_GAIN = 1.5
DARK_OUTSIDE = 0.25  # as dark as the cell's darkest 30 %, outside it in its region: this share of those inside
SEEN_KEPT = 1 << 22  # px; the image as the network saw it is kept for these checks up to this size (12 MB)
# a "cell" lying mostly (over this share of its pixels) outside the microscope's field (black
# vignetting, slide edges: see scale.out_of_field) is dropped
OUT_OF_FIELD_SHARE = 0.5
NEAR_BLACK = 0.04  # of the image's bright level (99th percentile of the brightest channel): burned in, not smear
# white burned in: pixels whose darkest channel is within WHITE_SPIKE of the image's whitest, a share
# WHITE_SHARE of the image, above a smear whose own bright end (99.5th percentile of the darkest channel
# of the rest) lies under WHITE_GAP of that: a mark, not the smear's (saturated or glaring) background.
# (More than a quarter white is background, or a white frame, which scale.out_of_field finds.)
WHITE_SPIKE, WHITE_GAP, WHITE_SHARE = 0.97, 0.9, (5e-4, 0.25)


def check_image(image) -> np.ndarray:
    """Validate a user image; return it as HxWx3 (dtype kept). Raises ValueError."""
    if not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"image must be a numpy array, got {type(image).__name__}") from e
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape}); expected HxW or HxWx3/4 with pixels")
    if image.dtype == bool or image.dtype.kind not in "uif":
        raise ValueError(f"image dtype {image.dtype} is not supported; expected an integer (uint8, uint16, ...) or float dtype")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise ValueError(
            f"image has shape {image.shape}; expected a single 2-D image HxW or HxWx3/4 "
            "(for stacks, call segment() once per plane)"
        )
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image of shape {image.shape} is too small; expected at least 8x8 pixels")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    if image.dtype.kind == "f" and image.dtype.itemsize > 4:
        top = float(np.abs(image).max())
        if top > 1e30:  # float64 past float32's range (which the resizing works in): brought to 0..1,
            image = image / top  # the same image to the normalisation, which is by percentiles anyway
    from .io import to_rgb

    return to_rgb(image)


def channel_ranges(rgb: np.ndarray, lo: float = 0.5, hi: float = 99.5, outside: np.ndarray | None = None,
                   shading: np.ndarray | None = None) -> np.ndarray:
    """Robust per-channel (low, high) from a strided subsample of at most ~1 Mpx, of the smear only:
    near-black pixels (burned-in scale bars, labels, a black frame: see :func:`smear_pixels`) and
    those ``outside`` the microscope's field (:func:`.scale.out_of_field`) do not count. With
    ``shading`` (:func:`.scale.shading`), those of the evenly lit image (:func:`unshade`)."""
    h, w = rgb.shape[:2]
    step = max(1, int(np.sqrt(h * w / 1e6)))
    sub = rgb[::step, ::step]
    if shading is not None:
        sub = unshade(sub, shading, (0, 0), sub.shape[:2])
    keep = smear_pixels(sub, outside)
    sub = sub.reshape(-1, 3) if keep is None else sub[keep]
    if sub.dtype == np.uint8:
        p = _percentiles_u8(sub, (lo, hi))
    else:
        p = np.percentile(sub.astype(np.float32), [lo, hi], axis=0)  # 2x3
    # the smallest range: relative to the values for floats (0..1e-4 is an image too), >= 1e-3 for integers
    floor = 1e-30 if sub.dtype.kind == "f" else 1.0
    p[1] = np.maximum(p[1], p[0] + 1e-3 * max(float(np.abs(p).max()), floor))
    return p


def smear_pixels(rgb: np.ndarray, outside: np.ndarray | None = None) -> np.ndarray | None:
    """Which pixels of an HxWx3 image are smear (None: all of them, the usual case).

    Not smear: pixels whose brightest channel is under :data:`NEAR_BLACK` of the image's bright level
    (a stained nucleus never is, at any exposure: the threshold follows the image's own brightness),
    i.e. burned-in scale bars, text, label boxes, a black frame or round field of view; white ones
    (:func:`white_marks`); and those
    ``outside`` the microscope's field (a mask on any grid). A black 0.5 % of the image pulled the
    low percentile to black and flattened the contrast the networks see (F1 0.31-0.41 on BCCD
    fields with a label box or scale bar). When under 5 % would be left, all pixels count.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # (np.maximum/minimum: ~20x faster than max(axis=-1))
    brightest = np.maximum(np.maximum(r, g), b)
    if brightest.dtype == np.uint8:
        top = percentile_from_counts(np.bincount(brightest.ravel(), minlength=256), 99)
    else:
        top = float(np.percentile(brightest, 99))
    keep = None
    if float(brightest.min()) >= 0 and top > 0:  # (values below 0: no black level to go by)
        keep = brightest > NEAR_BLACK * top
        white = white_marks(np.minimum(np.minimum(r, g), b))
        if white is not None:
            keep &= ~white
    if outside is not None:
        inside = ~nearest_mask(outside, rgb.shape[:2])
        keep = inside if keep is None else keep & inside
    if keep is None or keep.all() or keep.sum() < 0.05 * keep.size:
        return None
    return keep


def white_marks(darkest: np.ndarray) -> np.ndarray | None:
    """Burned-in white (a label box, a scale bar, white outside the field) in an image whose darkest
    channel is ``darkest`` (values >= 0): None when there is none.

    White marks are a group of pixels near the image's whitest, clearly above the smear's own bright
    end: its background. A saturated or glaring background runs up to the whitest without a gap and is
    left alone. A white label box took the normalisation's bright end from the background's 215 to
    255 on BCCD (detection F1 0.88).
    """
    if darkest.dtype == np.uint8:
        counts = np.bincount(darkest.ravel(), minlength=256)
        whitest = int(np.flatnonzero(counts)[-1])
        first = int(np.ceil(WHITE_SPIKE * whitest))  # (darkest >= WHITE_SPIKE * whitest, on integers)
        n_white = int(counts[first:].sum())
        if whitest == 0 or not WHITE_SHARE[0] <= n_white / darkest.size <= WHITE_SHARE[1]:
            return None
        if percentile_from_counts(counts[:first], 99.5) >= WHITE_GAP * whitest:  # the smear's bright end
            return None
        return darkest >= first
    whitest = float(darkest.max())
    mark = darkest >= WHITE_SPIKE * whitest
    n_white = int(mark.sum())
    if whitest <= 0 or not WHITE_SHARE[0] <= n_white / darkest.size <= WHITE_SHARE[1]:
        return None
    if float(np.percentile(darkest[~mark], 99.5)) >= WHITE_GAP * whitest:  # the smear's bright end
        return None
    return mark


def light_window(shading: np.ndarray, corner, size, shape) -> np.ndarray:
    """The light's level (float32, ``size`` = (h, w)) over the window whose top-left pixel is at
    ``corner`` of an image of ``shape``: ``shading`` (:func:`.scale.shading`, on any grid over the
    image) interpolated bilinearly."""
    gh, gw = shading.shape
    h, w = int(size[0]), int(size[1])

    def weights(start, n, total, grid):  # grid coordinates of pixel centres, clamped; lower index, fraction
        c = np.clip((np.arange(start, start + n) + 0.5) * grid / total - 0.5, 0, grid - 1)
        i = np.minimum(np.floor(c).astype(np.intp), grid - 2) if grid > 1 else np.zeros(n, np.intp)
        return i, (c - i).astype(np.float32) if grid > 1 else np.zeros(n, np.float32)

    iy, fy = weights(corner[0], h, shape[0], gh)
    ix, fx = weights(corner[1], w, shape[1], gw)
    g = shading.astype(np.float32, copy=False)
    if gh > 1:
        g = g[iy] * (1 - fy)[:, None] + g[iy + 1] * fy[:, None]
    else:
        g = np.repeat(g, h, 0)
    if gw > 1:
        g = g[:, ix] * (1 - fx)[None] + g[:, ix + 1] * fx[None]
    else:
        g = np.repeat(g, w, 1)
    return g


def unshade(window: np.ndarray, shading: np.ndarray, corner, shape) -> np.ndarray:
    """``window`` (HxWx3, any dtype; its top-left pixel at ``corner`` of an image of ``shape``) divided
    by the light's level there (:func:`light_window`). Integers stay integers (rounded, clipped to the
    dtype), as the image would have been under even light."""
    g = light_window(shading, corner, window.shape[:2], shape)
    out = window.astype(np.float32) / g[..., None]
    if window.dtype.kind in "ui":
        info = np.iinfo(window.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(window.dtype)
    return out.astype(window.dtype, copy=False)


def unshade_image(rgb: np.ndarray, shading: np.ndarray, rows: int = 512) -> np.ndarray:
    """A copy of the whole HxWx3 ``rgb`` under even light (:func:`unshade`), band by band (no float
    copy of a large image)."""
    out = np.empty_like(rgb)
    for y0 in range(0, rgb.shape[0], rows):
        out[y0:y0 + rows] = unshade(rgb[y0:y0 + rows], shading, (y0, 0), rgb.shape[:2])
    return out


def is_greyscale(rgb: np.ndarray) -> bool:
    """Whether an HxWx3 image is a greyscale camera's (its channels equal, to 2 % of its range, on 99 %
    of a strided sample of ~65000 pixels)."""
    h, w = rgb.shape[:2]
    step = max(1, int(np.sqrt(h * w / 65536)))
    sub = rgb[::step, ::step].astype(np.float32)
    spread = float(np.ptp(sub[..., 1]))
    if spread <= 0:
        return False
    off = np.maximum(np.abs(sub[..., 0] - sub[..., 1]), np.abs(sub[..., 2] - sub[..., 1]))
    return float(np.mean(off <= 0.02 * spread)) >= 0.99


def grey_to_colour(rgb: np.ndarray, table: dict, rows: int = 512) -> np.ndarray:
    """A greyscale smear (HxWx3, equal channels, any dtype) in the colours of stained smears: each
    grey level, stretched as :func:`channel_ranges` stretches it, becomes the mean colour of training
    pixels at that level (``table``: a segmenter card's ``grey_colours``, made by
    benchmarks/grey_colours.py). HxWx3 uint8, band by band (no float copy of a large image)."""
    colours = np.asarray(table["colours"], np.float32)  # bins x 3, in stretched units (0..1)
    centres = (np.arange(len(colours), dtype=np.float32) + 0.5) / len(colours)
    lo, hi = channel_ranges(rgb)[:, 1]  # (the channels are equal: the green one's, of the smear only)
    out = np.empty(rgb.shape[:2] + (3,), np.uint8)
    for y0 in range(0, rgb.shape[0], rows):
        q = (rgb[y0:y0 + rows, :, 1].astype(np.float32) - lo) / max(float(hi - lo), 1e-12)
        for c in range(3):
            v = np.interp(q, centres, colours[:, c])
            out[y0:y0 + rows, :, c] = np.clip(np.rint(v * 255), 0, 255).astype(np.uint8)
    return out


def in_colour(rgb: np.ndarray, card: dict | None) -> np.ndarray:
    """``rgb`` as the networks of ``card`` want it: a greyscale camera's image in stained smears' colours
    (:func:`grey_to_colour`, when the card has ``grey_colours``), any other as it is."""
    table = (card or {}).get("grey_colours")
    return grey_to_colour(rgb, table) if table and is_greyscale(rgb) else rgb


def nearest_mask(mask: np.ndarray, shape) -> np.ndarray:
    """A boolean mask brought to ``shape`` by nearest neighbour (no float copy of a big grid)."""
    h, w = int(shape[0]), int(shape[1])
    mh, mw = mask.shape[:2]
    if (mh, mw) == (h, w):
        return mask.astype(bool, copy=False)
    rows = np.minimum(((np.arange(h) + 0.5) * mh / h).astype(np.intp), mh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mw / w).astype(np.intp), mw - 1)
    return mask.astype(bool, copy=False)[rows[:, None], cols[None, :]]


def _percentiles_u8(values: np.ndarray, qs) -> np.ndarray:
    """``np.percentile(values, qs, axis=0)`` (linear method, same values) for Nx3 uint8, from histograms."""
    out = np.empty((len(qs), values.shape[1]), np.float32)
    for c in range(values.shape[1]):
        counts = np.bincount(values[:, c], minlength=256)
        out[:, c] = [percentile_from_counts(counts, q) for q in qs]
    return out


def normalise(rgb: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Map each channel's robust range to 0..1 (float32, clipped to -0.5..1.5)."""
    r = np.asarray(ranges, np.float32)  # check_image brought float64 data into float32's range
    x = (rgb.astype(np.float32) - r[0]) / (r[1] - r[0])
    return np.clip(x, -0.5, 1.5)


def _resize(x: np.ndarray, shape, order: int) -> np.ndarray:
    from skimage.transform import resize

    if tuple(x.shape[:2]) == tuple(shape):
        return x
    return resize(x, shape, order=order, preserve_range=True, anti_aliasing=False, mode="edge").astype(x.dtype)


def _resize_image(rgb: np.ndarray, shape) -> np.ndarray:
    """Resize an HxWx3 image with Pillow (bilinear, area-aware when shrinking), dtype-lean.

    uint8 stays uint8; other dtypes go channel by channel through float32, so a
    100-Mpx smear never needs a float64 copy.
    """
    from PIL import Image

    h, w = int(shape[0]), int(shape[1])
    if rgb.shape[:2] == (h, w):
        return rgb
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.BILINEAR))
    out = np.empty((h, w, rgb.shape[2]), np.float32)
    for c in range(rgb.shape[2]):
        ch = Image.fromarray(np.ascontiguousarray(rgb[..., c], dtype=np.float32))  # mode "F"
        out[..., c] = np.asarray(ch.resize((w, h), Image.BILINEAR))
    return out


def _tile_starts(n: int, tile: int, margin: int) -> list[int]:
    """Starts of the kept (centre) windows, multiples of ``tile - 2*margin``."""
    core = tile - 2 * margin
    return list(range(0, max(n, 1), core))


def iter_probabilities(
    x: np.ndarray, net, device, *, tile: int = 768, margin: int = 64, batch_size: int = 1, ranges=None,
    shading=None,
) -> Iterator:
    """Yield ``("progress", done, total)``; finally ``("probs", fg_u8, dist_u8)``.

    ``x``: HxWx3 image at network scale, float32 normalised (:func:`normalise`), or
    any dtype with its ``ranges`` (:func:`channel_ranges`): then each window is
    normalised as it is cut (same values; no float32 copy of a large image), and with
    ``shading`` (:func:`.scale.shading`) brought to even light first (:func:`unshade`).
    Outputs are uint8 (probability * 255) of the same HxW, filled tile by tile
    (bounded memory).
    """
    import torch

    h, w = x.shape[:2]
    tile = int(tile)
    margin = min(int(margin), tile // 4)
    # tiles are full-size windows; outside the image they hold 1.0 (background-like, as in training)
    core = tile - 2 * margin
    ys, xs = _tile_starts(h, tile, margin), _tile_starts(w, tile, margin)
    border = 16  # context beyond the image edge for a single window
    small = h + 2 * border <= tile and w + 2 * border <= tile
    if small:  # one window just large enough, rounded up to the network stride
        margin = border
        th = int(np.ceil((h + 2 * margin) / 32) * 32)
        tw = int(np.ceil((w + 2 * margin) / 32) * 32)
        ys, xs = [0], [0]
    else:
        th = tw = tile
    fg = np.zeros((h, w), np.uint8)
    dist = np.zeros((h, w), np.uint8)
    jobs = [(y0, x0) for y0 in ys for x0 in xs]
    total = len(jobs)
    yield ("progress", 0, total)
    from .device import cpu_bf16_fast

    # mixed precision: float16 on CUDA, bfloat16 on CPUs with native bfloat16 (see cpu_bf16_fast); a network
    # stored in bfloat16 (load_model does that on such CPUs) takes bfloat16 input and needs no autocast
    weights_dtype = next(net.parameters()).dtype
    amp = None
    if weights_dtype == torch.float32:
        amp = torch.float16 if device.type == "cuda" else torch.bfloat16 if device.type == "cpu" and cpu_bf16_fast() else None
    done = 0
    b0 = 0
    while b0 < total:
        batch_jobs = jobs[b0 : b0 + batch_size]
        arr = np.ones((len(batch_jobs), 3, th, tw), np.float32)  # outside = background-like
        for i, (y0, x0) in enumerate(batch_jobs):
            # window [y0 - margin, y0 - margin + th) clipped to the image
            wy0, wx0 = y0 - margin, x0 - margin
            sy0, sx0 = max(wy0, 0), max(wx0, 0)
            sy1, sx1 = min(wy0 + th, h), min(wx0 + tw, w)
            win = x[sy0:sy1, sx0:sx1]
            if shading is not None:
                win = unshade(win, shading, (sy0, sx0), (h, w))
            win = win if ranges is None else normalise(win, ranges)
            arr[i, :, sy0 - wy0 : sy1 - wy0, sx0 - wx0 : sx1 - wx0] = np.moveaxis(win, -1, 0)
        out = None
        try:
            out = _forward(net, arr, device, weights_dtype, amp)
        except Exception as e:  # noqa: BLE001 - only running out of device memory is handled here
            if not _is_out_of_memory(e):
                raise
        if out is None:  # out of memory (freed once the exception and its frames are gone)
            _free_device_memory(device)
            if batch_size > 1:  # the same tiles again, fewer at a time (results do not depend on it)
                batch_size = max(1, batch_size // 2)
                continue
            raise MemoryError(
                f"the {device.type} device ran out of memory on one {th}x{tw} tile; free its memory "
                "(other programs, other models) or run on device='cpu'"
            ) from None
        for i, (y0, x0) in enumerate(batch_jobs):
            ch = min(core if not small else h, h - y0)
            cw = min(core if not small else w, w - x0)
            fg[y0 : y0 + ch, x0 : x0 + cw] = out[i, 0, margin : margin + ch, margin : margin + cw]
            dist[y0 : y0 + ch, x0 : x0 + cw] = out[i, 1, margin : margin + ch, margin : margin + cw]
        done += len(batch_jobs)
        b0 += len(batch_jobs)
        yield ("progress", done, total)
    yield ("probs", fg, dist)


def _forward(net, arr: np.ndarray, device, weights_dtype, amp) -> np.ndarray:
    """The network's two maps for a batch of windows, as uint8 (probability x 255)."""
    import torch

    from .models import forward_pass

    with torch.inference_mode(), forward_pass():
        t = torch.from_numpy(arr).to(device, weights_dtype).contiguous(memory_format=torch.channels_last)
        if amp is not None:
            with torch.autocast(device.type, dtype=amp):
                out = net(t)
        else:
            out = net(t)
        return torch.sigmoid(out.float()).mul_(255).round_().to(torch.uint8).cpu().numpy()


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _free_device_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def instances_from_maps(fg_u8: np.ndarray, dist_u8: np.ndarray, min_area: float) -> np.ndarray:
    """Instance labels from foreground and normalised-distance maps (uint8 0..255).

    Each connected foreground component is split by a watershed on the
    distance map seeded at its cores (distance > SEED_THRESHOLD); components
    and pieces smaller than ``min_area`` pixels are dropped.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    fg = fg_u8 > int(PROB_THRESHOLD * 255)
    comps, n = ndi.label(fg)
    out = np.zeros(fg.shape, np.int32)
    next_id = 1
    for i, sl in enumerate(ndi.find_objects(comps), start=1):
        if sl is None:
            continue
        region = comps[sl] == i
        if region.sum() < min_area:
            continue
        d = dist_u8[sl].astype(np.float32) / 255.0
        seeds, ns = ndi.label((d > SEED_THRESHOLD) & region)
        if ns > 1:
            # drop tiny seeds (noise) before flooding
            sizes = ndi.sum(np.ones_like(seeds), seeds, index=np.arange(1, ns + 1))
            keep = np.zeros(ns + 1, bool)
            keep[1:] = sizes >= max(2.0, 0.02 * min_area)
            seeds = np.where(keep[seeds], seeds, 0)
        if seeds.max() > 1:
            pieces = watershed(-d, seeds, mask=region)
        else:
            pieces = region.astype(np.int32)
        for j in range(1, int(pieces.max()) + 1):
            m = pieces == j
            if m.sum() >= min_area:
                out[sl][m] = next_id
                next_id += 1
    return out


def upsample_instances(small: np.ndarray, fg_u8: np.ndarray, shape) -> np.ndarray:
    """Bring labels at network scale back to ``shape``, cell by cell (ids stay 1..N, in order).

    Each cell's outline comes from the bilinearly upsampled probability map
    (smooth at any scale); the split between touching cells from the labels.
    """
    for item in iter_upsample_instances(small, fg_u8, shape):
        if item[0] == "labels":
            return item[1]
    raise AssertionError("iter_upsample_instances gave no labels")  # pragma: no cover


def iter_upsample_instances(small: np.ndarray, fg_u8: np.ndarray, shape, every: int = 64) -> Iterator:
    """:func:`upsample_instances` as a generator: ``("outlining", done, total)`` every ``every`` cells
    (seconds on a large smear: progress, and a point to cancel at), then ``("labels", labels)``."""
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels

    H, W = shape
    h, w = small.shape
    if (h, w) == (H, W):
        yield ("labels", small)
        return
    fy, fx = H / h, W / w
    out = np.zeros((H, W), np.int32)
    kept = np.zeros(int(small.max()) + 1, bool)
    objects = ndi.find_objects(small)
    for i, sl in enumerate(objects, start=1):
        if i % every == 0:
            yield ("outlining", i, len(objects))
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - 2, 0), min(sl[0].stop + 2, h)
        x0, x1 = max(sl[1].start - 2, 0), min(sl[1].stop + 2, w)
        Y0, Y1 = int(round(y0 * fy)), int(round(y1 * fy))
        X0, X1 = int(round(x0 * fx)), int(round(x1 * fx))
        if Y1 <= Y0 or X1 <= X0:
            continue
        prob = _resize(fg_u8[y0:y1, x0:x1].astype(np.float32), (Y1 - Y0, X1 - X0), order=1)
        lab = _resize(small[y0:y1, x0:x1], (Y1 - Y0, X1 - X0), order=0)
        lab = expand_labels(lab, distance=max(fy, fx) + 1)
        m = (prob > PROB_THRESHOLD * 255) & (lab == i)
        if not m.any():
            m = lab == i
        tgt = out[Y0:Y1, X0:X1]
        m &= tgt == 0
        if m.any():
            tgt[m] = i
            kept[i] = True
    yield ("labels", out if kept[1:].all() else _renumber(out, kept))  # (a cell lost in the upsampling)


def _renumber(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``labels`` with only the ids where ``keep`` (indexed by id) is True, numbered 1..N in order."""
    ids = np.zeros(len(keep), np.int32)
    keep = keep.copy()
    keep[0] = False
    ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return ids[labels]


def drop_out_of_field(small: np.ndarray, outside: np.ndarray | None) -> np.ndarray:
    """``small`` without the cells lying mostly outside the field (``outside``: a mask on any grid
    over the same image, as :func:`.scale.out_of_field` gives); the rest numbered 1..N again."""
    n = int(small.max())
    if outside is None or n == 0:
        return small
    out = _resize(outside, small.shape, order=0)
    area = np.bincount(small.ravel(), minlength=n + 1)
    dark = np.bincount(small[out], minlength=n + 1)
    keep = dark <= OUT_OF_FIELD_SHARE * np.maximum(area, 1)
    return small if keep[1:].all() else _renumber(small, keep)


def _one_cluster_growth(small: np.ndarray, target: float, x: np.ndarray) -> float | None:
    """The scale factor that would make all cells found one cell, when that reading is plausible.

    On a tight crop of one large cell whose stain the red-cell estimate misreads (it then measures
    nuclear lobes, not red cells), the network sees the cell about 1.5-2x too large and cuts it into
    lobe-sized "cells" lying together. When every cell found lies in one cluster of about one to two
    and a half cells' width, and the image has hardly any other cells (red cells) outside it, return
    the cluster's size over the target size; else None.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    from .scale import foreground

    boxes = [sl for sl in ndi.find_objects(small) if sl is not None]
    if not 2 <= len(boxes) <= 8:  # a cluster of at most 2.5 cells' width holds a few lobes, not a smear's cells
        return None
    y0, y1 = min(b[0].start for b in boxes), max(b[0].stop for b in boxes)
    x0, x1 = min(b[1].start for b in boxes), max(b[1].stop for b in boxes)
    if max(y1 - y0, x1 - x0) > 1.5 * CLUSTER_GROWTH[1] * target:
        return None
    r = max(1, int(round(target / 4)))
    win = np.s_[max(y0 - r, 0) : y1 + r, max(x0 - r, 0) : x1 + r]  # the cells and r px around them
    cells = small[win] > 0
    near = ndi.binary_dilation(cells, iterations=r)
    if ndi.label(near)[1] != 1:
        return None
    g = float(np.sqrt(4 * convex_hull_image(cells).sum() / np.pi)) / target
    if not CLUSTER_GROWTH[0] <= g <= CLUSTER_GROWTH[1]:
        return None
    objects = foreground(_resize_image(x, small.shape))  # x: the image at network scale (as it came)
    n = int(objects.sum())
    others = (n - int((objects[win] & near).sum())) / max(n, 1)
    return g if others < RED_CELL_SHARE else None


def _one_body_growth(small: np.ndarray, target: float, x: np.ndarray, shading: np.ndarray | None = None,
                     outside: np.ndarray | None = None) -> float | None:
    """The scale factor that would make one cell found the whole stained body it lies in, when plausible.

    On a tight crop of one cell seen too large, the network can outline a single part of it (a nuclear
    lobe, the nucleus without its pale cytoplasm) at about the working size, so the size check passes it.
    When exactly one cell was found, it covers under BODY_SHARE of the stained region it lies in, that
    region holds beside it as many pixels as dark as the cell's darkest (DARK_OUTSIDE of their number:
    more nucleus), and the image has hardly any other cells outside the region, return the region's
    size over the target size (from BODY_GROWTH_MIN up to CLUSTER_GROWTH[1]); else None. The caller
    keeps the new scale only if it then finds one cell that has grown over the first
    (:func:`_one_cell_grew`). ``x``: the image at network scale; ``shading``, ``outside``: the light
    (evened first: a dim edge is not nucleus) and what lies outside the field (left out), as for the network.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    from .scale import foreground

    if small.max() != 1:
        return None
    cell = small > 0
    x = _resize_image(x, small.shape)  # the image at network scale (as it came)
    if shading is not None:
        x = unshade_image(x, shading)
    # beside the cell (within one working diameter of its box) and in its region there must be more of
    # what is darkest in the cell (other lobes of its nucleus), not only paler red cells touching it (a
    # whole WBC in a crowded smear); looked at first without the region, which costs more
    dark = np.minimum(np.minimum(x[..., 0], x[..., 1]), x[..., 2])
    t = np.percentile(dark[cell], 30)
    enough = DARK_OUTSIDE * int((dark[cell] <= t).sum())
    rows, cols = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))
    r = int(np.ceil(target))
    near = np.s_[max(rows[0] - r, 0) : rows[-1] + r + 1, max(cols[0] - r, 0) : cols[-1] + r + 1]
    dark_out = (dark <= t) & ~cell
    if outside is not None:
        out = nearest_mask(outside, small.shape)
        dark_out &= ~out
    dark_out = dark_out[near]
    if int(dark_out.sum()) < enough:
        return None
    objects = foreground(x)
    if outside is not None:
        objects &= ~out
    regions, _ = ndi.label(objects | cell)
    ids = np.unique(regions[cell])
    body = np.isin(regions, ids[ids > 0])
    if cell.sum() >= BODY_SHARE * body.sum() or int((dark_out & body[near]).sum()) < enough:
        return None
    g = float(np.sqrt(4 * convex_hull_image(body).sum() / np.pi)) / target
    if not BODY_GROWTH_MIN <= g <= CLUSTER_GROWTH[1]:
        return None
    others = int((objects & ~body).sum()) / max(int(objects.sum()), 1)
    return g if others < RED_CELL_SHARE else None


def _one_cell_covers(small: np.ndarray, before: np.ndarray) -> bool:
    """Whether ``small`` is one cell covering most of what the cells of ``before`` covered (as image shares)."""
    if small.max() != 1:
        return False
    a_now = (small > 0).sum() / small.size
    a_before = (before > 0).sum() / before.size
    return a_now >= 0.7 * a_before


def _one_cell_grew(small: np.ndarray, before: np.ndarray) -> bool:
    """Whether ``small`` is one cell that holds the one cell of ``before`` and is BODY_GAIN times its area
    (as image shares): what was a part has become the cell, not the same cell seen coarser."""
    if small.max() != 1:
        return False
    now = nearest_mask(small > 0, before.shape)
    was = before > 0
    return now.sum() >= BODY_GAIN * was.sum() and (now & was).sum() >= 0.8 * was.sum()


def iter_segment(
    image,
    *,
    model=None,
    device=None,
    diameter=None,
    tile: int = 768,
    batch_size: int | None = None,
    refine: bool = True,
) -> Iterator:
    """The work of :func:`segment` as a generator, for progress and cancel.

    Yields ``("progress", done, total)`` per tile, ``("diameter", d)`` once
    known, ``("stage", text)`` before post-processing steps and ``("outlining",
    done, total)`` while cells are outlined at full resolution (many cells); the
    last item is ``("labels", labels)``. Closing the generator
    (``.close()``) between items stops the work with nothing half made.
    """
    from .device import resolve_device
    from .models import load_model
    from .scale import Look, estimate_diameter, field_of_view

    rgb = check_image(image)
    if diameter is not None:
        if isinstance(diameter, (bool, np.bool_)):
            raise ValueError(f"diameter must be a number of pixels or None, got {diameter!r}")
        try:
            diameter = float(diameter)
        except (TypeError, ValueError) as e:
            raise ValueError(f"diameter must be a number of pixels or None, got {diameter!r}") from e
        if not np.isfinite(diameter) or diameter <= 0:
            raise ValueError(f"diameter must be a positive number of pixels, got {diameter!r}")
        if diameter < MIN_DIAMETER_ARG:
            raise ValueError(f"diameter must be at least {MIN_DIAMETER_ARG:g} pixels (a WBC smaller than that cannot "
                             f"be outlined; the image would be enlarged past any use), got {diameter:g}")
    dev = resolve_device(device)
    if isinstance(model, tuple):  # an already loaded (network, card), as training uses
        net, card = model
    else:
        net, card = load_model(model, "segmenter", dev)
    target = float(card.get("target_diameter", 32.0))
    rgb = in_colour(rgb, card)  # a greyscale camera's image: in stained smears' colours
    if batch_size is None:
        batch_size = 8 if dev.type == "cuda" else 1
    # outside the microscope's field; uneven light (a gradient, vignetting, a soft field edge): evened out
    look = Look(rgb)  # one look at the image for both
    outside, light = field_of_view(rgb, look)
    ranges = channel_ranges(rgb, outside=outside, shading=light)
    estimated = diameter is None
    d = estimate_diameter(rgb, look=look) if estimated else diameter
    del look
    H, W = rgb.shape[:2]
    passes_left, fallbacks = REFINE_PASSES, list(FALLBACK_FACTORS)
    cluster_check, cluster_first, cluster_part = True, None, False  # cluster_first: set aside while tested
    while True:
        yield ("diameter", d)
        s = target / d
        h, w = max(int(round(H * s)), 8), max(int(round(W * s)), 8)
        x = _resize_image(rgb, (h, w))  # normalised window by window: uint8 stays uint8 at this size
        seen = x if cluster_check and h * w <= SEEN_KEPT else None  # for the checks below (as it is)
        if outside is not None:  # shown as background, as tiles see beyond the image's edge: a black
            # frame or round field of view in the network's view lost most cells (F1 0.00-0.25 on BCCD)
            x = x if x.flags.writeable and x is not rgb and x is not seen else x.copy()
            x[nearest_mask(outside, (h, w))] = np.asarray(ranges[1]).astype(x.dtype)
        fg = dist = None
        for item in iter_probabilities(x, net, dev, tile=tile, batch_size=batch_size, ranges=ranges, shading=light):
            if item[0] == "probs":
                _, fg, dist = item
            else:
                yield item
        del x
        yield ("stage", "separating cells")
        min_area = MIN_AREA_FRACTION * np.pi * (target / 2) ** 2
        small = drop_out_of_field(instances_from_maps(fg, dist, min_area), outside)
        if not (estimated and refine):
            break
        if cluster_first is not None:  # this pass tested the one-cell reading of a cluster (or a part)
            if (_one_cell_grew if cluster_part else _one_cell_covers)(small, cluster_first[1]):
                break
            d, small, fg = cluster_first  # it was not one cell: back to the first reading
            cluster_first = None
            yield ("diameter", d)
        areas = np.bincount(small.ravel())
        measured = np.flatnonzero(areas[1:] >= 0.35 * np.pi * (target / 2) ** 2) + 1  # fragments say nothing about size
        nothing = small.max() == 0
        if cluster_check and not nothing:  # once, on the first pass that found cells
            cluster_check = False
            view = seen if seen is not None else _resize_image(rgb, small.shape)
            grow = _one_cluster_growth(small, target, view)
            cluster_part = grow is None
            if cluster_part:
                grow = _one_body_growth(small, target, view, light, outside)
            del view
            if grow is not None:
                cluster_first = (d, small, fg)
                d = float(np.clip(d * grow, *DIAMETER_LIMITS))
                continue
        if nothing:
            if fallbacks:  # try the fallback scales
                d = float(np.clip(d * fallbacks.pop(0), *DIAMETER_LIMITS))
                continue
            break
        if passes_left == 0 or len(measured) == 0:
            break
        # self-consistency: cells should come out ~target px across at this scale
        areas = areas[measured]
        ratio = float(np.sqrt(4 * np.median(areas) / np.pi)) / target
        if 1 / (1 + REFINE_TOLERANCE) <= ratio <= 1 + REFINE_TOLERANCE:
            break
        d = float(np.clip(d * np.clip(ratio, *REFINE_CLAMP), *DIAMETER_LIMITS))
        passes_left -= 1
    yield ("stage", "outlining cells at full resolution")
    yield from iter_upsample_instances(small, fg, (H, W))


def segment(image, *, model=None, device=None, diameter=None, progress: Callable | None = None) -> np.ndarray:
    """Segment every white blood cell of a smear image.

    Parameters
    ----------
    image : HxW or HxWx3/4 array, uint8/uint16/float.
    model : None for the shipped U-Net, or the path of a ``.safetensors`` model
        (with its JSON card), e.g. what :func:`napari_wbc.finetune` returns.
    device : None/"auto" (cuda, then mps, then cpu) or a torch device string.
    diameter : expected WBC diameter in pixels; None estimates it.
    progress : optional callable ``(done_tiles, total_tiles)``.

    Returns
    -------
    HxW int32 labels: 0 background, 1..N one per WBC (nucleus + cytoplasm).
    """
    labels = None
    for item in iter_segment(image, model=model, device=device, diameter=diameter):
        if item[0] == "progress" and progress is not None:
            progress(item[1], item[2])
        elif item[0] == "labels":
            labels = item[1]
    return labels


def label_areas(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, areas)`` of the cells (ids > 0, sorted) of integer ``labels``: a bincount a few million
    pixels at a time while the ids are not absurdly sparse (bincount casts to int64: a whole 300 Mpx
    uint16 layer was a 2.4 GB copy, for one new cell too), else ``np.unique``."""
    top = int(labels.max()) if labels.size else 0
    if top <= 4 * labels.size + 65536:
        counts = np.zeros(top + 1, np.int64)
        flat = labels.reshape(-1)
        step = 1 << 22
        for i in range(0, flat.size, step):
            counts += np.bincount(flat[i:i + step].astype(np.intp, copy=False), minlength=top + 1)
        ids = np.nonzero(counts)[0]
        counts = counts[ids]
    else:
        ids, counts = np.unique(labels, return_counts=True)
    keep = ids > 0
    return ids[keep], counts[keep]


def cell_table(labels: np.ndarray):
    """Per-cell measurements: label, area, centroid and bbox (a pandas DataFrame)."""
    import pandas as pd
    from skimage.measure import regionprops_table

    cols = ["label", "area", "centroid-0", "centroid-1", "bbox-0", "bbox-1", "bbox-2", "bbox-3"]
    labels = np.asarray(labels)
    if labels.max() <= 0:
        return pd.DataFrame({c: pd.Series(dtype=float if "centroid" in c else int) for c in cols})
    back = None
    if int(labels.max()) > max(2**16, labels.size):  # sparse large ids (2**31 and more would wrap in int32):
        from skimage.segmentation import relabel_sequential  # measured as 1..N, named by their own ids

        labels, _, back = relabel_sequential(labels)
    # integer labels as they are (an int32 copy of a 300 Mpx uint16 layer: +1.2 GB and 4x the time)
    t = regionprops_table(labels if labels.dtype.kind in "iu" else labels.astype(np.int32),
                          properties=("label", "area", "centroid", "bbox"))
    df = pd.DataFrame(t)[cols]
    if back is not None:
        df["label"] = back.out_values[np.searchsorted(back.in_values, df["label"].to_numpy())].astype(np.int64)
    df["area"] = df["area"].astype(int)
    return df


def cell_features(labels: np.ndarray):
    """Per-cell table for a napari labels layer's ``features``: an ``index`` column (the label id,
    which napari reads) + :func:`cell_table`."""
    df = cell_table(labels)
    df.insert(0, "index", df["label"].astype(int))
    return df.reset_index(drop=True)


def remeasure(features, labels: np.ndarray):
    """Bring a per-cell ``features`` table up to date with edited ``labels``: ``(features, new_ids, removed_ids)``.

    Geometry is measured again, rows of erased cells dropped, new cells get
    empty types; every other column (types, corrections) is kept per label.
    """
    return merge_measured(features, cell_features(labels))


def merge_measured(features, measured):
    """:func:`remeasure` with the new measurements (``cell_features`` of the edited labels) given:
    the merge alone, cheap, so the measuring can run in a thread."""
    import pandas as pd

    cur = measured.copy()
    if features is None or len(features.columns) == 0 or "label" not in features:
        return cur, [int(i) for i in cur["label"]], []
    old = features.drop_duplicates("label")
    extra = [c for c in old.columns if c not in cur.columns]
    merged = cur.merge(old[["label", *extra]], on="label", how="left")
    if "corrected" in merged:
        merged["corrected"] = merged["corrected"].fillna(False).astype(bool)
    if "cell_type" in merged:
        merged["cell_type"] = merged["cell_type"].astype(object).where(pd.notna(merged["cell_type"]), None)
    before, now = set(old["label"].astype(int)), set(cur["label"].astype(int))
    return merged, sorted(now - before), sorted(before - now)
