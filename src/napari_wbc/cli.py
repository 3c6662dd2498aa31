"""The headless command-line tool: ``napari-wbc segment | train | adapt | demo``.

Exit status: 0 success; 1 some images failed (``segment``) or the work failed;
2 bad arguments or inputs (nothing was done); 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad arguments or inputs: reported on one line, exit status 2."""


def _err(msg: str) -> None:
    print(f"napari-wbc: {msg}", file=sys.stderr)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _diameter(text: str) -> float:
    from .core.segment import MIN_DIAMETER_ARG

    v = _positive_float(text)
    if v < MIN_DIAMETER_ARG:
        raise argparse.ArgumentTypeError(f"expected a WBC diameter of at least {MIN_DIAMETER_ARG:g} pixels, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text!r}")
    return v


# ------------------------------------------------------------------ parser
CLASSIFIER_HELP = ("classifier .safetensors, or a shipped classifier's name, e.g. wbc_classifier_stain_robust "
                   "(better on some stains unlike ours, worse on others: docs/models.md) (default: the "
                   "classifier fine-tuned with --model, if any, else the shipped wbc_classifier)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="napari-wbc",
        description="White blood cell segmentation, typing and differential counts on stained blood smears.",
        epilog="Run 'napari-wbc COMMAND --help' for the options of a command.",
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"napari-wbc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "segment",
        help="segment and type the WBCs of image files or folders; write labels, tables and a report",
        description=(
            "Segment every white blood cell of each image, type it (neutrophil, lymphocyte, monocyte,\n"
            "eosinophil, basophil) and write, in --out:\n"
            "  <name>_labels.tif  instance labels (lossless uint16/uint32 TIFF, 0 = background)\n"
            "  <name>_cells.csv   one row per cell: label, cell_type, confidence, p_<type>,\n"
            "                     area, centroid-0/1, bbox-0..3 (pixels)\n"
            "  <name>.done        marker written last: the image is complete\n"
            "  summary.csv        one row per image: status, n_wbc, n_<type>, pct_<type>, error\n"
            "  report.html        differential counts, outlined previews and the run's settings\n"
            "<name> is the image's file name without suffix, prefixed with its folder's name when\n"
            "two inputs share a stem. Images whose outputs are complete are skipped (re-running\n"
            "resumes an interrupted run) unless --overwrite. A file that cannot be processed is\n"
            "reported and the others go on; the exit status is then 1."
        ),
        formatter_class=fmt,
    )
    s.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files (jpg, png, tif, bmp) or folders of them; mask files (*-mask.*, *_mask.*, "
                        "masks/) are left out")
    s.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if needed)")
    s.add_argument("--recursive", "-r", action="store_true", help="also look in sub-folders of folder PATHs")
    s.add_argument("--model", metavar="FILE", help="segmenter .safetensors (default: the shipped model)")
    s.add_argument("--classifier", metavar="FILE", help=CLASSIFIER_HELP)
    s.add_argument("--no-classify", action="store_true", help="count cells without typing them")
    s.add_argument("--device", default="auto", metavar="D",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps (default: auto)")
    s.add_argument("--diameter", type=_diameter, metavar="PX",
                   help="expected WBC diameter in pixels (default: estimated per image from the red cells)")
    s.add_argument("--workers", "-j", type=_positive_int, default=1, metavar="N",
                   help="images processed in parallel by N processes, CPU threads divided among them (default: 1)")
    s.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the per-image jobs on a dask.distributed scheduler, e.g. tcp://host:8786 "
                        "(files and --out must be reachable from its workers)")
    s.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist and replace them (without it, another image's or hand-corrected outputs are kept and that image fails)")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_segment)

    t = sub.add_parser(
        "train",
        help="fine-tune the segmenter on your images and masks",
        description=(
            "Fine-tune the WBC segmenter on images and their masks, and write a new model\n"
            "(.safetensors + .json card). Masks are paired with images by name: 'x-mask.*' or\n"
            "'x_mask.*' (SigTuple style, possibly in the same folder as the images), 'x.*' in\n"
            "MASKS_DIR, or 'x_labels.tif' (the outputs of 'napari-wbc segment --out', corrected in\n"
            "napari and saved over). A mask is a binary image (cells are split into connected\n"
            "components) or instance labels (16/32-bit). Types corrected by hand (the rows of the\n"
            "cells table saved with the labels, x_cells.csv, that say 'corrected') fine-tune the\n"
            "classifier too, written beside the new model. Use the new model with\n"
            "'segment --model FILE': it types cells with that classifier."
        ),
        formatter_class=fmt,
    )
    t.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images")
    t.add_argument("masks_dir", metavar="MASKS_DIR", help="folder of masks (may be IMAGES_DIR)")
    t.add_argument("--base", metavar="FILE", help="segmenter to start from (default: the shipped model)")
    t.add_argument("--epochs", type=_positive_int, metavar="E",
                   help="epochs of 25 steps of 8 crops (default: 12, whatever the number of cells)")
    t.add_argument("--out", "-o", metavar="FILE",
                   help="new model file (.safetensors; never overwritten), or an existing folder for a new "
                        "dated file in it. Default: a new dated file in the user's napari-wbc data folder")
    t.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, mps (default: auto)")
    t.add_argument("--allow-unpaired", action="store_true",
                   help="train on the pairs found even if some images or masks have no partner")
    t.add_argument("--classifier", metavar="FILE",
                   help="the classifier that the corrected types fine-tune: a .safetensors file or a shipped name "
                        "(default: the one that typed the cells, as recorded in the labels files; else the one "
                        "fine-tuned with --base, if any; else the shipped wbc_classifier)")
    t.add_argument("--no-types", action="store_true",
                   help="learn the outlines only, even when the cells tables hold corrected types")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser(
        "adapt",
        help="adapt the classifier to a lab's stain from the cells of its smears (no types needed)",
        description=(
            "Segment every image, then re-estimate the classifier's first batch norms on all the cells\n"
            "found, each weighted by its predicted type, and write a new classifier (.safetensors +\n"
            ".json card). No cell needs a type. Give the smears of one lab or staining run, at least\n"
            "50 WBCs in all; then type them with 'napari-wbc segment ... --classifier FILE'. An option\n"
            "for stains unlike the training sets' (docs/models.md): check its calls on cells you know."
        ),
        formatter_class=fmt,
    )
    a.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of them (as for segment)")
    a.add_argument("--recursive", "-r", action="store_true", help="also look in sub-folders of folder PATHs")
    a.add_argument("--classifier", metavar="FILE",
                   help="classifier to adapt: a .safetensors file or a shipped name (default: wbc_classifier)")
    a.add_argument("--model", metavar="FILE", help="segmenter that finds the cells (default: the shipped model)")
    a.add_argument("--diameter", type=_diameter, metavar="PX",
                   help="expected WBC diameter in pixels (default: estimated per image)")
    a.add_argument("--out", "-o", metavar="FILE",
                   help="new classifier file (.safetensors; never overwritten), or an existing folder for a new "
                        "dated file in it. Default: a new dated file in the user's napari-wbc data folder")
    a.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, mps, for segmenting (default: auto)")
    a.set_defaults(func=cmd_adapt)

    d = sub.add_parser(
        "demo",
        help="segment and type the bundled sample smear and print its differential count",
        description="Run segment + classify on the sample smear shipped with napari-wbc (nothing is downloaded).",
    )
    d.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, mps (default: auto)")
    d.add_argument("--model", metavar="FILE", help="segmenter .safetensors (default: the shipped model)")
    d.add_argument("--classifier", metavar="FILE", help=CLASSIFIER_HELP)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    """Entry point of the ``napari-wbc`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return status
    except UsageError as e:
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err({"cmd_segment": "interrupted; finished images are kept, re-run the same command to go on",
              "cmd_train": "interrupted; no model was written",
              "cmd_adapt": "interrupted; no model was written"}.get(getattr(args.func, "__name__", ""), "interrupted"))
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed by the reader (``napari-wbc demo | head``): not an error of ours
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit does not raise again
        return EXIT_OK
    except OSError as e:  # a folder or disk that failed under the run: one line, not a traceback
        _err(f"failed: {e}")
        return EXIT_FAILED


# ------------------------------------------------------------------ shared checks
def _classifier_option(classifier, model):
    """``--classifier``, or without it the classifier fine-tuned with ``--model`` (said on stderr), or
    None (the shipped one)."""
    if classifier is None and model is not None:
        from .core.finetune import classifier_for

        paired = classifier_for(model)
        if paired is not None:
            _err(f"typing cells with {paired.name}, the classifier fine-tuned with {Path(model).name} "
                 "(--classifier to choose another)")
            return str(paired)
    return classifier


def _check_model(model, kind: str, option: str) -> str | None:
    """Absolute path of a user model (or None for the shipped one), checked without loading torch."""
    from .core.models import read_card, resolve_model_path

    try:
        path = resolve_model_path(model, kind)
        if model is None and not path.is_file():
            raise UsageError(
                f"the shipped {kind} {str(path)!r} is not installed; pass {option} FILE "
                "(e.g. a model written by 'napari-wbc train')"
            )
        card = read_card(path)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None
    if card["kind"] != kind:
        raise UsageError(f"{option}: {str(path)!r} is a {card['kind']}, expected a {kind}")
    return None if model is None else str(path.resolve())


def _classifier_available() -> bool:
    from .core.models import SHIPPED

    return SHIPPED["classifier"].is_file()


def _check_device(device: str):
    from .core.device import resolve_device

    try:
        return resolve_device(device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None


def _check_writable_folder(folder: Path, option: str) -> None:
    """UsageError unless ``folder`` exists and takes new files, or can be made where its nearest
    existing parent takes them (a probe file, removed at once: permissions as the system applies them)."""
    import tempfile

    folder = Path(folder)
    existing = folder
    try:
        while not existing.exists():
            if existing.is_symlink():
                raise UsageError(f"{option} {str(folder)!r}: {str(existing)!r} is a link to nothing (or a loop)")
            if existing.parent == existing:
                break
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"{option} {str(folder)!r}: {str(existing)!r} is not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{option} {str(folder)!r} cannot be written to: {e.strerror or e}") from None


# ------------------------------------------------------------------ segment
def cmd_segment(args) -> int:
    from .core import batch
    from .core.models import SHIPPED

    out_dir = Path(args.out).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {str(out_dir)!r} exists and is not a folder")
    if args.scheduler and args.workers > 1:
        raise UsageError("--workers and --scheduler exclude each other (the cluster decides the parallelism)")
    if args.scheduler:
        try:  # before anything is made or read
            import importlib

            importlib.import_module("distributed")
        except ImportError as e:
            raise UsageError(f"--scheduler needs dask.distributed: pip install 'napari-wbc[dask]' ({e})") from None
    _check_writable_folder(out_dir, "--out")  # before any image is processed, not after all of them
    model = _check_model(args.model, "segmenter", "--model")
    classify = not args.no_classify
    classifier = None
    if classify:
        chosen = _classifier_option(args.classifier, model)
        if chosen is None and not _classifier_available():
            _err(f"the shipped classifier {str(SHIPPED['classifier'])!r} is not installed: "
                 "counting cells without typing them (pass --classifier FILE to type them)")
            classify = False
        else:
            classifier = _check_model(chosen, "classifier", "--classifier")
    elif args.classifier:
        _err("--classifier is ignored with --no-classify")
    device = args.device
    if not args.scheduler:  # remote workers resolve "auto" themselves
        device = str(_check_device(device))

    files, notes = batch.collect_images(args.paths, recursive=args.recursive, exclude=[out_dir])
    for n in notes:
        _err(n)
    if not files:
        raise UsageError(f"no image files ({', '.join(batch.IMAGE_SUFFIXES)}) found in {' '.join(args.paths)}")

    settings = batch.Settings(
        model=model, classifier=classifier, classify=classify, device=device,
        diameter=args.diameter, overwrite=args.overwrite,
    )
    # a broken model file fails once here, not once per image (in-process, this load is reused)
    _preload(settings, device if not args.scheduler and args.workers == 1 else "cpu")
    info = batch.run_info(
        settings, out_dir, "napari-wbc " + " ".join(shlex.quote(a) for a in args.argv),
        f"dask scheduler {args.scheduler}" if args.scheduler else f"{args.workers} process(es)")
    from tqdm import tqdm

    bar = tqdm(total=len(files), unit="image", file=sys.stderr, disable=args.quiet, dynamic_ncols=True)
    n_failed = 0

    def on_result(row):
        nonlocal n_failed
        if row["status"] == batch.STATUS_FAILED:
            n_failed += 1
            bar.write(f"napari-wbc: failed: {row['error']}", file=sys.stderr)
        bar.set_postfix_str(f"{row['image']} {row['status']}" + (f", {n_failed} failed" if n_failed else ""),
                            refresh=False)
        bar.update(1)

    def note(message):  # fewer worker processes than asked: the report says so too
        bar.write(f"napari-wbc: {message}", file=sys.stderr)
        info["parallelism"] = message

    t0 = datetime.datetime.now()
    try:
        rows = batch.run_batch(files, out_dir, settings, workers=args.workers, scheduler=args.scheduler,
                               on_result=on_result, on_note=note)
    except OSError as e:
        if args.scheduler:
            raise UsageError(f"could not reach the dask scheduler at {args.scheduler!r}: {e}") from None
        raise
    finally:
        bar.close()
    info["wall time"] = f"{(datetime.datetime.now() - t0).total_seconds():.1f} s"
    devices = sorted({r["device"] for r in rows if r.get("device")})
    if devices:
        info["device"] = f"{info['device']} (used: {', '.join(devices)})" if args.scheduler else ", ".join(devices)
    kept = batch.finish_run(rows, info, out_dir)
    if kept:
        _err("the earlier summary lists images this run does not cover; kept as "
             + ", ".join(repr(str(k)) for k in kept))
    _print_segment_summary(rows, out_dir)
    return EXIT_FAILED if n_failed else EXIT_OK


def _preload(settings, device) -> None:
    from .core.models import load_model

    try:
        load_model(settings.model, "segmenter", device)
        if settings.classify:
            load_model(settings.classifier, "classifier", device)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _print_segment_summary(rows, out_dir: Path) -> None:
    from .core.batch import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, tally

    n, cells = tally(rows)
    edited = sum(bool(r.get("edited")) for r in rows if r["status"] == STATUS_SKIPPED)
    done = f"{n[STATUS_SKIPPED]} already done" + (f" ({edited} counted from outputs corrected by hand)" if edited else "")
    msg = f"{len(rows)} image(s): {n[STATUS_OK]} processed, {done}, {n[STATUS_FAILED]} failed; {cells} WBC(s)"
    print(msg, file=sys.stderr)
    print(f"summary: {out_dir / 'summary.csv'}", file=sys.stderr)
    print(f"report:  {out_dir / 'report.html'}", file=sys.stderr)


# ------------------------------------------------------------------ train
def _mask_key(m: Path) -> str:
    """The image stem a mask file belongs to (``x`` for ``x-mask.*``, ``x_mask.*`` or ``x.*``), lower case."""
    from .core.io import MASK_SUFFIXES

    stem = m.stem
    for s in MASK_SUFFIXES:
        if stem.lower().endswith(s):
            return stem[: -len(s)].lower()
    return stem.lower()


def _labels_key(m: Path) -> str | None:
    """``x`` for the batch tool's ``x_labels.tif`` (lower case), else None."""
    from .core.io import LABELS_STEM_SUFFIX

    stem = m.stem.lower()
    if m.suffix.lower() in (".tif", ".tiff") and stem.endswith(LABELS_STEM_SUFFIX) and len(stem) > len(LABELS_STEM_SUFFIX):
        return stem[: -len(LABELS_STEM_SUFFIX)]
    return None


def pair_images_masks(images_dir, masks_dir) -> tuple[list[tuple[Path, Path]], list[Path], list[Path]]:
    """Pair images with masks by stem: ``x`` with ``x-mask``/``x_mask`` (either folder) or ``x`` in ``masks_dir``.

    Returns ``(pairs, unpaired_images, unpaired_masks)``.
    """
    from .core.batch import is_mask_name
    from .core.io import IMAGE_SUFFIXES

    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    same = images_dir.resolve() == masks_dir.resolve()

    def listing(d):
        return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                      and not f.name.startswith("."))

    images = [f for f in listing(images_dir) if not is_mask_name(f)]
    stems = {f.stem.lower() for f in images}
    # x_labels.tif (the batch tool's labels, corrected and saved over) beside image x.*: a mask, not an image
    batch_labels = [f for f in images if _labels_key(f) in stems]
    images = [f for f in images if f not in batch_labels]
    masks = listing(masks_dir) if not same else [f for f in listing(masks_dir) if is_mask_name(f)] + batch_labels
    beside = [] if same else [f for f in listing(images_dir) if is_mask_name(f)] + batch_labels  # x-mask.* next to x.*
    masks += beside
    by_key: dict[str, list[Path]] = {}
    for m in masks:
        by_key.setdefault(_mask_key(m), []).append(m)
        if _labels_key(m) is not None:  # x_labels.tif is x's (and stays 'x_labels''s, an image of that name)
            by_key.setdefault(_labels_key(m), []).append(m)
    pairs, unpaired, used = [], [], set()
    for im in images:
        key = im.stem.lower()
        cands = by_key.get(key, [])
        if not cands:
            unpaired.append(im)
            continue
        # prefer one named for the image itself (x-mask, x_mask, x; then x_labels), one in MASKS_DIR, then one
        # with the same suffix as the image, then a lossless one
        cands = sorted(cands, key=lambda m: (_mask_key(m) != key, m in beside, m.suffix.lower() != im.suffix.lower(),
                                             m.suffix.lower() in (".jpg", ".jpeg")))
        pairs.append((im, cands[0]))
        used.add(cands[0])
    paired_keys = {im.stem.lower() for im, _ in pairs}
    # a mask beside the images that lost to one in MASKS_DIR is an alternative, not an orphan
    unpaired_masks = [m for m in masks if m not in used and not (
        m in beside and (_mask_key(m) in paired_keys or _labels_key(m) in paired_keys))]
    return pairs, unpaired, unpaired_masks


def _names(paths, limit=10) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def cmd_train(args) -> int:
    import time

    import numpy as np

    from .core.io import ImageReadError, read_image, read_mask

    for opt, d in (("IMAGES_DIR", args.images_dir), ("MASKS_DIR", args.masks_dir)):
        if not Path(d).is_dir():
            raise UsageError(f"{opt} {str(d)!r} is not a folder")
    base = _check_model(args.base, "segmenter", "--base")
    from .core.finetune import model_output_path, user_models_dir

    if args.out is not None:
        try:
            out = Path(args.out).expanduser()
            if not out.is_dir():  # a folder stays a folder: the dated name is chosen when the model is saved
                args.out = str(model_output_path(out))
        except ValueError as e:
            raise UsageError(f"--out: {e}") from None
    target = user_models_dir() if args.out is None else Path(args.out)
    _check_writable_folder(target if target.is_dir() or args.out is None else target.parent, "--out")
    dev = str(_check_device(args.device))
    pairs, lone_images, lone_masks = pair_images_masks(args.images_dir, args.masks_dir)
    if not pairs:
        raise UsageError(
            f"no image/mask pairs in {str(args.images_dir)!r} and {str(args.masks_dir)!r}: masks must be named "
            "'x-mask.*' or 'x_mask.*' for image 'x.*', or 'x.*' in MASKS_DIR"
            + (f"; images without a mask: {_names(lone_images)}" if lone_images else "")
        )
    if (lone_images or lone_masks) and not args.allow_unpaired:
        what = []
        if lone_images:
            what.append(f"images without a mask: {_names(lone_images)}")
        if lone_masks:
            what.append(f"masks without an image: {_names(lone_masks)}")
        raise UsageError("; ".join(what) + " (pass --allow-unpaired to train on the pairs found)")
    images, labels, cell_types, typers = [], [], [], set()
    for im, m in pairs:
        try:
            a = read_image(im)
            lab, types, typer = (read_mask(m), {}, None) if args.no_types else _mask_with_types(m)
        except ImageReadError as e:
            raise UsageError(str(e)) from None
        if lab.shape != a.shape[:2]:
            raise UsageError(f"mask {str(m)!r} is {lab.shape[1]}x{lab.shape[0]} px but image {str(im)!r} is "
                             f"{a.shape[1]}x{a.shape[0]} px; they must match")
        images.append(a)
        labels.append(lab)
        cell_types.append(types)
        if types:
            typers.add(typer)
    n_cells = sum(int(len(np.unique(lab)) - (lab.min() == 0)) for lab in labels)
    if n_cells == 0:
        raise UsageError(f"the masks hold no cell ({_names([m for _, m in pairs])}): nothing to learn from")
    empty = [m for (_, m), lab in zip(pairs, labels) if not lab.any()]
    if empty:  # a field without any WBC is not learned from (finetune would leave it out with a warning)
        print(f"left out, their masks hold no cell: {_names(empty)}", file=sys.stderr)
        keep = [k for k, lab in enumerate(labels) if lab.any()]
        pairs, images, labels = [pairs[k] for k in keep], [images[k] for k in keep], [labels[k] for k in keep]
        cell_types = [cell_types[k] for k in keep]
    cell_types, classifier = _types_to_learn(cell_types, typers, args, base)
    print(f"training on {len(pairs)} image(s), {n_cells} cell(s); device {dev}", file=sys.stderr)
    t0 = time.time()

    def progress(epoch, total, metrics):
        parts = [f"epoch {epoch}/{total}"]
        if metrics.get("loss") is not None:
            parts.append(f"loss {metrics['loss']:.4f}")
        if metrics.get("stage") == "classifier":
            parts = [f"classifier epoch {epoch}/{total}"]
            if metrics.get("holdout_accuracy") is not None:
                parts.append(f"hold-out accuracy {metrics['holdout_accuracy']:.3f}"
                             + (f" (before {metrics['before_accuracy']:.3f})"
                                if metrics.get("before_accuracy") is not None else ""))
            elif metrics.get("before_accuracy") is not None:  # epoch 0: the classifier as it was
                parts.append(f"hold-out accuracy before {metrics['before_accuracy']:.3f}")
        elif metrics.get("matched_dice") is not None and metrics.get("f1") is not None:
            parts.append(f"hold-out Dice {metrics['matched_dice']:.3f} F1 {metrics['f1']:.3f}")
        parts.append(f"({time.time() - t0:.0f} s)")
        print("  ".join(parts), file=sys.stderr, flush=True)

    import warnings

    from . import finetune

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            path = finetune(images, labels, base=base, epochs=args.epochs, device=dev,
                            output=args.out, progress=progress, cell_types=cell_types, classifier=classifier)
        except (ValueError, OSError) as e:  # OSError: the folder, the disk; FileExistsError: a name taken meanwhile
            _err(f"training failed: {e}")
            return EXIT_FAILED
    for w in caught:
        if issubclass(w.category, UserWarning):
            _err(str(w.message))
    if cell_types is not None:
        _err(_classifier_outcome(path))
    print(str(path))
    return EXIT_OK


def _mask_with_types(mask: Path):
    """``(labels, {label: type}, classifier)`` of a training mask: with the cells table saved beside it
    (napari-wbc's writer, the batch tool), the types of its rows marked ``corrected`` and the classifier
    that typed them (recorded in the labels TIFF, None when not); the label ids are then kept as they
    are in the file (the table names them). Otherwise ``(read_mask(mask), {}, None)``."""
    import numpy as np
    import pandas as pd

    from .core.classifier_finetune import corrected_types, present_ids
    from .core.classify import CLASSES, OTHER
    from .core.io import read_image, read_mask, saved_cells_table, saved_source

    table_path = saved_cells_table(mask)
    if not table_path.is_file():
        return read_mask(mask), {}, None
    try:
        table = pd.read_csv(table_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cells table {str(table_path)!r} of mask {str(mask)!r} cannot be read: {e}") from None
    if not {"label", "cell_type", "corrected"} <= set(table.columns):  # no type was corrected by hand
        return read_mask(mask), {}, None
    raw = read_image(mask)
    if raw.ndim != 2 or raw.dtype.kind not in "ui":
        raise UsageError(f"mask {str(mask)!r} has a cells table {table_path.name!r} with corrected types but is not "
                         f"a labels image (2-D integer ids; got {raw.dtype} {raw.shape})")
    labels = raw.astype(np.int32)
    types = corrected_types(table)
    for label, t in types.items():
        if t not in (*CLASSES, OTHER):
            raise UsageError(f"cells table {str(table_path)!r}: cell {label} is typed {t!r}; expected one of "
                             f"{', '.join((*CLASSES, OTHER))} (or --no-types to learn the outlines only)")
    if types:  # a row whose cell is not in the labels any more (erased by hand, saved by another program)
        present = present_ids(labels, list(types))
        types = {k: v for k, v in types.items() if k in present}
    typer = saved_source(mask).get("classifier")
    return labels, types, (Path(typer) if typer and Path(typer).is_file() else None)


def _types_to_learn(cell_types, typers, args, base):
    """``(cell_types or None, classifier or None)`` for finetune, said on stderr: the corrected types and the
    classifier they fine-tune (``--classifier``, else the one that typed them when the labels files agree,
    else None: the one fine-tuned with ``--base``, else the shipped one)."""
    from .core.classify import OTHER
    from .core.classifier_finetune import check_cell_types
    from .core.finetune import typing_classifier
    from .core.models import read_card, resolve_model_path

    n = sum(t != OTHER for types in cell_types for t in types.values())
    if args.no_types:
        if args.classifier:
            _err("--classifier is ignored with --no-types")
        return None, None
    if n == 0:
        if args.classifier:
            _err("--classifier is ignored: no cells table beside the masks has a type corrected by hand")
        return None, None
    if args.classifier:
        classifier = _check_model(args.classifier, "classifier", "--classifier")
        chosen, why = resolve_model_path(classifier, "classifier"), "--classifier"
    else:
        classifier, chosen, why = typing_classifier(typers, base)
        classifier = None if classifier is None else str(classifier)
    try:
        check_cell_types(cell_types, read_card(chosen, "classifier"))
    except ValueError as e:
        _err(f"the corrected types are not learned, the outlines are: {e}")
        return None, None
    n_tables = sum(bool(types) for types in cell_types)
    _err(f"{n} cell type{'s' if n != 1 else ''} corrected by hand in {n_tables} cells table{'s' if n_tables != 1 else ''}"
         f" fine-tune the classifier {Path(chosen).stem} ({why})")
    return cell_types, classifier


def _classifier_outcome(seg_path) -> str:
    """What became of the corrected types (the same words as the Train widget's)."""
    from .core.finetune import trained_classifier, types_outcome

    mine = trained_classifier(seg_path)
    return types_outcome(mine) + ("; 'segment --model' with the new model types with it" if mine is not None else "")


# ------------------------------------------------------------------ adapt
def cmd_adapt(args) -> int:
    import time

    from .core import batch
    from .core.io import ImageReadError, read_image

    model = _check_model(args.model, "segmenter", "--model")
    classifier = _check_model(args.classifier, "classifier", "--classifier")
    from .core.adapt import MIN_CELLS, AdaptJob

    try:
        job = AdaptJob(model=classifier, output=args.out)
    except ValueError as e:
        raise UsageError(str(e)) from None  # (names the output file or the classifier)
    _check_writable_folder(job.out_path.parent, "--out")
    dev = _check_device(args.device)
    files, notes = batch.collect_images(args.paths, recursive=args.recursive)
    for n in notes:
        _err(n)
    if not files:
        raise UsageError(f"no image files ({', '.join(batch.IMAGE_SUFFIXES)}) found in {' '.join(args.paths)}")
    import numpy as np

    from . import segment
    from .core.classifier_finetune import cells_inputs

    t0 = time.time()
    xs, n_images, failed = [], 0, []
    for k, f in enumerate(files, 1):
        try:
            image = read_image(f)
            labels = segment(image, model=model, device=dev, diameter=args.diameter)
            x = cells_inputs([image], [labels], job.card)
        except (ImageReadError, ValueError) as e:
            _err(f"{f}: left out ({e})")
            failed.append(f)
            continue
        n_images += 1
        if len(x):
            xs.append(x)
        print(f"[{k}/{len(files)}] {Path(f).name}: {len(x)} WBC(s)", file=sys.stderr, flush=True)
    n_cells = sum(len(x) for x in xs)
    if n_cells < MIN_CELLS:
        _err(f"found {n_cells} WBC(s) in {n_images} image(s); adapting to a stain needs at least {MIN_CELLS}: "
             "give more smears of the lab")
        return EXIT_FAILED
    try:
        path = job.run(np.concatenate(xs), n_images=n_images)
    except (ValueError, OSError) as e:  # FileExistsError: a name taken meanwhile
        _err(f"adapting failed: {e}")
        return EXIT_FAILED
    from .core.models import read_card

    ft = read_card(path)["finetune"]
    show = lambda c: " / ".join(f"{v} {k}" for k, v in c.items() if v)  # noqa: E731
    _err(f"{n_cells} WBCs from {n_images} image(s) in {time.time() - t0:.0f} s; their types by the classifier "
         f"before: {show(ft['types_before'])}; adapted: {show(ft['types_after'])}")
    _err(f"type them with: napari-wbc segment PATH... --out DIR --classifier {shlex.quote(str(path))}")
    print(str(path))
    return EXIT_FAILED if failed else EXIT_OK


# ------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    import time

    from ._sample_data import sample_path
    from .core.batch import OTHER, cells_table, differential
    from .core.io import read_image
    from .core.models import SHIPPED

    model = _check_model(args.model, "segmenter", "--model")
    classify = True
    chosen = _classifier_option(args.classifier, model)
    if chosen is None and not _classifier_available():
        _err(f"the shipped classifier {str(SHIPPED['classifier'])!r} is not installed: counting cells only")
        classify = False
    classifier = _check_model(chosen, "classifier", "--classifier") if classify else None
    dev = _check_device(args.device)
    from types import SimpleNamespace

    _preload(SimpleNamespace(model=model, classify=classify, classifier=classifier), dev)  # a broken model: exit 2
    path = sample_path()
    image = read_image(path)
    t0 = time.time()
    from . import segment

    labels = segment(image, model=model, device=dev)
    types = None
    if classify and labels.max() > 0:
        from . import classify as classify_fn

        types = classify_fn(image, labels, model=classifier, device=dev)
    table = cells_table(labels, types)
    dt = time.time() - t0
    print(f"{path.name} ({image.shape[1]}x{image.shape[0]} px), device {dev}: {len(table)} WBC(s) in {dt:.1f} s")
    if classify:
        counts, pct = differential(table["cell_type"])
        print(f"{'type':<12}{'count':>6}{'%':>8}")
        for c, k in counts.items():
            if c == OTHER and not k:  # (only ever typed by hand)
                continue
            print(f"{c:<12}{k:>6}{'' if pct[c] is None else f'{pct[c]:.1f}':>8}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
