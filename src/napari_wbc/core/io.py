"""Reading smear images, masks and Pascal VOC boxes (no napari, no Qt)."""
from __future__ import annotations

import contextlib
import json
import errno
import os
import stat
import tempfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_EXIF_ORIENTATION = 0x0112
MASK_SUFFIXES = ("-mask", "_mask")


class ImageReadError(ValueError):
    """A file that looked like an image could not be read."""


MAX_PIXELS_ENV = "NAPARI_WBC_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 1_000_000_000  # segment() needs about 17 bytes per pixel: ~17 GB at 1 Gpx
_PIL_LIMIT = threading.Lock()


def max_pixels() -> int:
    """The largest image (height x width) :func:`read_image` reads: ``NAPARI_WBC_MAX_PIXELS`` or 1e9."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        n = int(float(value))
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r}: expected a positive number of pixels, e.g. 2e9")
    return n


def _check_size(path: Path, h: int, w: int) -> None:
    limit = max_pixels()
    if h * w > limit:
        raise ImageReadError(
            f"{str(path)!r} is {w} x {h} pixels ({h * w / 1e6:,.0f} Mpx), more than napari-wbc reads "
            f"({limit / 1e6:,.0f} Mpx; segmenting takes about 17 bytes of memory per pixel, "
            f"{17 * h * w / 2**30:,.0f} GiB for this one): cut it into fields, or set {MAX_PIXELS_ENV} to read it")


@contextlib.contextmanager
def _pil_unlimited():
    """Pillow's global size limit lifted for what is opened inside (under a lock)."""
    from PIL import Image

    with _PIL_LIMIT:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _open_pil(path: Path):
    """``PIL.Image.open`` with napari-wbc's size limit instead of Pillow's: Pillow warns from 89 Mpx
    and refuses from 179 Mpx ("decompression bomb"), while segment() handles 100+ Mpx smears in
    bounded memory. Pillow's global limit is lifted only for this call (under a lock)."""
    from PIL import Image

    with _pil_unlimited():
        im = Image.open(path)
    try:
        _check_size(path, im.size[1], im.size[0])
    except ImageReadError:
        im.close()
        raise
    return im


def image_size(path) -> tuple[int, int] | None:
    """``(height, width)`` of an image file from its header (nothing decoded); None when unreadable."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(str(path)) as tf:
                series = tf.series[0]
                return series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")]
        from PIL import Image

        with _pil_unlimited(), Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001 - reading it for real reports what is wrong
        return None


def is_image_path(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path) -> np.ndarray:
    """Read an image file as stored: HxW (grey) or HxWxC, uint8/uint16/float.

    Palette images are expanded to RGB; a JPEG/PNG's EXIF orientation is applied
    (a phone's photo opens upright, as photo viewers show it). Raises ImageReadError
    naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{str(path)!r}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            arr = _read_tiff(path)
        else:
            with _open_pil(path) as im:
                im.load()  # forces decoding: truncated files fail here
                if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # a phone's photo: upright, as viewers show it
                    from PIL import ImageOps

                    im = ImageOps.exif_transpose(im)
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode in ("1", "CMYK", "YCbCr", "LA"):
                    im = im.convert("L" if im.mode in ("1", "LA") else "RGB")
                elif im.mode.startswith("I;16"):
                    arr16 = np.array(im, dtype=np.uint16)
                    return arr16
                arr = _pil_array(im)
                if arr.dtype == np.int32:  # PIL mode "I"
                    arr = arr.astype(np.uint32 if arr.min() >= 0 else np.int32)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - every decoder failure becomes a clear message
        raise ImageReadError(f"{str(path)!r} could not be read as an image: {e}") from e
    if arr.size == 0 or arr.ndim not in (2, 3):
        raise ImageReadError(f"{str(path)!r}: expected a 2-D greyscale or RGB image, got shape {arr.shape}")
    return arr


def _pil_array(im) -> np.ndarray:
    """``np.asarray(im)`` for a decoded Pillow image, filled strip by strip for large 8-bit images:
    Pillow hands its pixels over as one ``tobytes()`` copy beside its own 4 bytes per pixel (the peak
    was 3.3x an RGB smear's size, and the array read-only); strips need only the array's own memory."""
    bands = len(im.getbands())
    if im.mode not in ("L", "RGB", "RGBA") or im.width * im.height < (1 << 22):
        return np.asarray(im)
    out = np.empty((im.height, im.width, bands) if bands > 1 else (im.height, im.width), np.uint8)
    rows = max(1, (1 << 24) // (im.width * bands))  # ~16 MB strips
    for y in range(0, im.height, rows):
        out[y:y + rows] = np.asarray(im.crop((0, y, im.width, min(y + rows, im.height))))
    return out


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF's first series as HxW or HxWxC, read by the file's own axes: colour samples (``S``, or
    3-4 ``C`` channels) go last; planes of a stack (``Z``, ``T``, or greyscale pages ``Q``/``I``)
    are refused with the file named, not read as the channels of one colour image."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        axes = series.axes
        if "Y" in axes and "X" in axes:  # before decoding: a too large image is refused from its header
            _check_size(path, series.shape[axes.index("Y")], series.shape[axes.index("X")])
        arr = np.asarray(series.asarray())
    keep = [i for i, n in enumerate(arr.shape) if n > 1 or axes[i] in "YX"]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if arr.ndim == 3 and axes[-1] not in "SC" and axes[0] in "SC" and arr.shape[0] in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar colour: samples / channels first
    elif arr.ndim >= 3 and not (arr.ndim == 3 and axes[-1] in "SC"):
        raise ImageReadError(
            f"{str(path)!r} holds a stack of {arr.shape[0]} planes (axes {axes}, shape {arr.shape}); "
            "expected one 2-D greyscale or colour image: save one plane per file")
    return arr


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """HxW / HxWx1 / HxWx3 / HxWx4 -> HxWx3, dtype kept (alpha dropped, grey repeated)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        return arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return arr
    raise ValueError(f"expected an HxW or HxWx3/4 image, got shape {arr.shape}")


def find_mask(path) -> Path | None:
    """The mask file that belongs to an image, if any.

    SigTuple style ``x.jpg`` + ``x-mask.jpg`` beside it, or the same stem
    under a sibling ``masks/`` folder (``../masks/x.png``).
    """
    path = Path(path)
    if any(path.stem.endswith(s) for s in MASK_SUFFIXES):
        return None
    for s in MASK_SUFFIXES:
        for ext in (path.suffix, *IMAGE_SUFFIXES):
            cand = path.with_name(f"{path.stem}{s}{ext}")
            if cand.is_file():
                return cand
    masks_dir = path.parent.parent / "masks"
    if masks_dir.is_dir() and path.parent.name != "masks":
        for ext in (path.suffix, *IMAGE_SUFFIXES):
            cand = masks_dir / f"{path.stem}{ext}"
            if cand.is_file():
                return cand
    return None


LABELS_STEM_SUFFIX = "_labels"  # the batch tool's x_labels.tif


def batch_labels_beside(path) -> Path | None:
    """The batch tool's ``x_labels.tif`` (or ``.tiff``) beside ``x.<ext>``, if there is one: ``x_cells.csv``
    is then that file's table, not ``x.tif``'s."""
    path = Path(path)
    return next((p for p in (path.with_name(f"{path.stem}{LABELS_STEM_SUFFIX}{e}") for e in (".tif", ".tiff"))
                 if p.is_file()), None)


def looks_like_labels(arr: np.ndarray) -> bool:
    """A 2-D integer array that is a label image, not a greyscale picture: 32/64-bit integers (no camera
    stores those), or mostly 0 with flat regions of a few values (napari's own writer saves hand-drawn
    labels as 8- or 16-bit). A picture is noisy where it is not black or clipped at the camera's top
    (2**k - 1), which is left out of the flatness test. All zero is labels: a field marked as holding no
    WBC (a picture that is black throughout shows nothing)."""
    if arr.ndim != 2 or arr.dtype.kind not in "ui" or arr.size == 0 or arr.shape[1] < 2:
        return False
    if arr.dtype.itemsize >= 4:
        return bool(arr.min() >= 0)
    if not arr.any():
        return True
    rows = arr[:: max(1, int(arr.size // 2_000_000))]  # whole rows: cells keep their width
    left, right = rows[:, :-1], rows[:, 1:]
    nz = left != 0
    n = int(nz.sum())
    if n == 0 or n > 0.7 * nz.size:
        return False
    values, counts = np.unique(left[nz], return_counts=True)
    top = int(values[np.argmax(counts)])
    clipped = (top + 1) & top == 0  # 2**k - 1: a camera's saturated level
    rest = nz & (left != top)
    if rest.sum() < 0.01 * n:  # one value (a mask of one id): labels unless it is a clipped level
        return not clipped
    return float((left[rest] == right[rest]).mean()) >= 0.85


def named_as_labels(path) -> bool:
    """A labels TIFF napari-wbc wrote, by its name alone: the batch's ``x_labels.tif``, or ``y.tif`` with
    its ``y_cells.csv`` beside (unless that table is the batch's ``y_labels.tif``'s: then ``y.tif`` is
    the smear it came from)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    if path.stem.endswith(LABELS_STEM_SUFFIX):
        return True
    return saved_cells_table(path).is_file() and batch_labels_beside(path) is None


def is_labels_tiff(path) -> bool:
    """Whether ``path`` is a labels TIFF, not a smear: a 2-D integer image that the reader opens as labels -
    napari-wbc's (``x_labels.tif``; ``y.tif`` with its ``y_cells.csv`` beside, unless that table is the
    batch's ``y_labels.tif``'s) or one :func:`looks_like_labels` (napari's own writer). False when the
    file cannot be read (reading it as a smear then says why); a colour TIFF is told from its header."""
    import tifffile

    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(str(path)) as tf:
            series = tf.series[0]
            shape, dtype = series.shape, series.dtype
        if sum(n > 1 for n in shape) > 2 or np.dtype(dtype).kind not in "ui":
            return False
        return named_as_labels(path) or looks_like_labels(read_image(path))
    except Exception:  # noqa: BLE001 - not readable here: not a labels file we can tell
        return False


def cells_table_path(labels_path) -> Path:
    """The per-cell table that goes with a labels file, for every writer and reader: the batch tool's
    ``x_labels.tif`` -> ``x_cells.csv`` (so labels corrected in napari and saved under that name keep
    one table with the batch outputs), any other ``y.tif`` -> ``y_cells.csv``."""
    labels_path = Path(labels_path)
    stem = labels_path.stem
    if stem.endswith(LABELS_STEM_SUFFIX) and len(stem) > len(LABELS_STEM_SUFFIX):
        stem = stem[: -len(LABELS_STEM_SUFFIX)]
    return labels_path.with_name(f"{stem}_cells.csv")


# what napari-wbc records in a labels TIFF's description (``{"napari_wbc": {...}}``): the image layer it
# belongs to, the segmenter and diameter that made it, the classifier that typed its cells
SAVED_META_KEYS = ("image_layer", "model", "diameter", "classifier")


def saved_source(path) -> dict:
    """What napari-wbc recorded in a labels TIFF's description (:data:`SAVED_META_KEYS`); {} for any other file."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            info = json.loads(tf.pages[0].description or "{}")
        value = info.get("napari_wbc") if isinstance(info, dict) else None
        return {k: v for k, v in value.items() if k in SAVED_META_KEYS} if isinstance(value, dict) else {}
    except Exception:  # noqa: BLE001 - another program's TIFF: nothing recorded
        return {}


def saved_cells_table(labels_path) -> Path:
    """The table to read for ``labels_path``: :func:`cells_table_path`, or for ``x_labels.tif`` the
    ``x_labels_cells.csv`` that napari-wbc's writer named it before, whichever was written last."""
    labels_path = Path(labels_path)
    table = cells_table_path(labels_path)
    legacy = labels_path.with_name(f"{labels_path.stem}_cells.csv")
    if legacy != table and legacy.is_file() and (
        not table.is_file() or legacy.stat().st_mtime_ns > table.stat().st_mtime_ns
    ):
        return legacy
    return table


def free_path(path, taken=None) -> Path:
    """``path``, else ``<stem>_2<suffix>``, ``_3``...: the first that ``taken`` (default: it exists)
    says is free - a new file never replaces one."""
    path = Path(path)
    taken = taken or Path.exists
    candidate, n = path, 1
    while taken(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def array_digest(arrays, *, algorithm: str = "blake2b", digest_size: int | None = 16) -> str:
    """A hex digest of arrays (shape, dtype and bytes of each, in order): blake2b-128 to tell whether
    labels changed, sha256 for a model card's record of its training data."""
    import hashlib

    h = hashlib.blake2b(digest_size=digest_size) if algorithm == "blake2b" else hashlib.new(algorithm)
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.view(np.uint8).reshape(-1))
    return h.hexdigest()


def labels_for_layer(labels: np.ndarray) -> np.ndarray:
    """Instance labels as a napari Labels layer should hold them: uint16 when every id fits
    (0..65535), else int32/int64 as given.

    napari draws uint8/uint16 labels straight into its texture; wider ones are first remapped on
    every refresh, which on a 68 Mpx smear costs 0.4-0.5 s per brush stroke or undo and 2 s to add
    the layer (``benchmarks/edit_latency.py``); uint16 does both in under 0.1 s. Same ids, same
    pixels; ``segment()`` itself still returns int32.
    """
    arr = np.asarray(labels)
    if arr.dtype == np.uint16 or arr.dtype.kind not in "ui" or arr.size == 0:
        return arr
    if arr.min() >= 0 and arr.max() < 2**16:
        return arr.astype(np.uint16)
    return arr


def mask_to_labels(mask: np.ndarray) -> np.ndarray:
    """A stored mask (binary, JPEG, part-level PNG, or instance labels) -> int32 instance labels.

    - one non-zero value (0/1, 0/255, bool): a binary mask, split into connected components;
    - 8-bit with values at both ends (JPEG noise around 0 and 255, >= 90 % of the non-zero pixels
      within 32 of an end): thresholded at 128, then split;
    - 8-bit with at most three non-zero values reaching 128 or more (Tecom's 0/128/255 nucleus and
      cytoplasm): one cell per connected region of everything non-zero;
    - otherwise integer instance labels, kept as they are (uint8 ids 1..N included: touching
      cells stay apart);
    - float masks: non-zero is foreground, split into connected components.
    """
    from scipy import ndimage as ndi

    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., :3].max(axis=-1)
    nz = m[m != 0]
    values = np.unique(nz)

    def components(fg):
        return ndi.label(fg)[0].astype(np.int32)

    if len(values) <= 1 or m.dtype.kind not in "ui" or m.dtype == bool:
        return components(m != 0)
    if m.dtype == np.uint8 and values[-1] >= 128:
        if len(values) <= 3:
            return components(m != 0)
        if np.mean((nz <= 32) | (nz >= 223)) >= 0.9:
            return components(m >= 128)  # lossy JPEG mask
    if values[0] < 0:
        raise ValueError("mask holds negative values; expected 0 = background, 1..N cells")
    return m.astype(np.int32)


def read_mask(path) -> np.ndarray:
    return mask_to_labels(read_image(path))


def find_voc(path) -> Path | None:
    """Pascal VOC ``.xml`` with the image's stem, beside it or in a sibling ``annotations/``."""
    path = Path(path)
    for cand in (path.with_suffix(".xml"), path.parent.parent / "annotations" / f"{path.stem}.xml"):
        if cand.is_file():
            return cand
    return None


def read_voc_boxes(path, names=("WBC",)) -> list[tuple[str, float, float, float, float]]:
    """Boxes ``(name, ymin, xmin, ymax, xmax)`` of the given object names from a VOC xml."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ImageReadError(f"{str(path)!r} is not a readable Pascal VOC xml: {e}") from e
    out = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if names and name not in names:
            continue
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            vals = [float(bb.findtext(k)) for k in ("ymin", "xmin", "ymax", "xmax")]
        except (TypeError, ValueError):
            continue
        out.append((name, *vals))
    return out


def _new_file_mode() -> int:
    """The permissions ``open()`` would give a new file: 0o666 less the umask."""
    try:
        with open("/proc/self/status") as f:  # Linux: read the umask without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class FolderBusy(OSError):
    """Another napari-wbc process held a folder's lock for longer than one would wait."""


@contextlib.contextmanager
def folder_lock(folder, timeout: float | None = None):
    """Hold an exclusive lock on ``folder`` (POSIX ``flock``; released if the process dies): napari-wbc
    processes writing outputs there (the batch tool, napari's writer) take turns. Where locks are not
    available, nothing is held. With ``timeout`` (seconds), :class:`FolderBusy` when the lock is not
    had by then (napari's writer runs on its UI thread: it must not wait on a hung share)."""
    import time

    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # not POSIX, or a folder that cannot be opened: no lock
        yield
        return
    try:
        try:
            if timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                end = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= end:
                            raise FolderBusy(
                                f"another napari-wbc process (a batch run) has been writing in {str(folder)!r} for "
                                f"over {timeout:g} s; nothing was saved: save again when it is done") from None
                        time.sleep(0.05)
        except FolderBusy:
            raise
        except OSError:  # a file system without locks
            pass
        yield
    finally:
        os.close(fd)


def fsync_path(path, *, best_effort: bool = False) -> None:
    """Flush ``path`` to disk: a file's data, or a folder's entries (a rename in it). With ``best_effort``
    a failure is ignored (a folder cannot be opened on Windows, some file systems refuse)."""
    try:  # (a file opened for writing: Windows flushes no other)
        fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:  # (a file system that cannot sync says so: EINVAL, ENOTSUP; not an I/O error)
        if not best_effort and e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def atomic_write(path, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then rename onto ``path`` (same folder, so atomic). Callers decide
    whether ``path`` may be replaced (models never are: :func:`~napari_wbc.core.models.save_model`).

    The file gets the permissions of the file it replaces, or those of a newly
    created file (mkstemp alone would leave it readable by its owner only). The new
    file is flushed to disk before the rename, and the folder after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else _new_file_mode()
    tmp = None
    try:  # (a long name is cut: the hidden temporary name must fit the file system's 255 bytes too)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_temp_stem(path)}.", suffix=TEMP_MARK + path.suffix)
        os.close(fd)
        write_fn(tmp)
        fsync_path(tmp)  # on disk before it takes the name: a crash never leaves the name on an empty file
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_path(path.parent, best_effort=True)  # and the rename itself
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and str(path) not in str(e):  # (disk full...)
            raise type(e)(e.errno, f"could not write {str(path)!r}: {e.strerror or e}") from e
        raise
    return path


TEMP_STEM_MAX = 100  # bytes of the name kept in a temporary's
TEMP_MARK = ".napari-wbc-tmp"  # in every temporary's name: what a killed run left is told from the user's files


def _temp_stem(path: Path) -> str:
    return path.stem.encode()[:TEMP_STEM_MAX].decode(errors="ignore")


def remove_stale_temporaries(folder, names, older_than_s: float = 3600.0) -> list[Path]:
    """Remove the hidden temporary files :func:`atomic_write` left in ``folder`` for the files named
    ``names`` when its process was killed (``.<stem>.XXXXXXXX.napari-wbc-tmp<suffix>``), older than
    ``older_than_s`` (a write in progress is younger); returns them. Nothing else is touched."""
    import re
    import time

    folder = Path(folder)
    wanted = {}
    for n in names:
        n = Path(n)
        wanted.setdefault(n.suffix, set()).add(_temp_stem(n))
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    pattern = re.compile(r"^\.(.+)\.[a-z0-9_]{8}" + re.escape(TEMP_MARK) + r"(\.[^.]+)$")
    now = time.time()
    for f in entries:
        m = pattern.match(f.name)
        if not m or m.group(1) not in wanted.get(m.group(2), ()):
            continue
        try:
            if f.is_file() and not f.is_symlink() and now - f.stat().st_mtime > older_than_s:
                f.unlink()
                removed.append(f)
        except OSError:
            pass
    return removed
