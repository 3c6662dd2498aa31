"""Fine-tuning the segmenter (and optionally the classifier) from corrected masks."""
from __future__ import annotations

import datetime
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

STEPS_PER_EPOCH = 25
BATCH_SIZE = 8
# 12 x 25 steps of 8 crops: ~2 min on 2 CPU cores whatever the amount of data (crops are sampled,
# so more corrected cells give more variety per step, not more steps)
DEFAULT_EPOCHS = 12
LEARNING_RATE = 1e-3  # chosen between 5e-4 and 1e-3 on benchmarks/finetune.py (see docs/benchmarks.md)
# as the shipped segmenter was trained (benchmarks/train_segmenter.py --field-norm / --empty-share /
# --small-field), so a fine-tuned model keeps leaving fields of red cells alone, small images included
FIELD_NORM = 0.3
EMPTY_SHARE = 0.15
SMALL_FIELD = 0.3


class FinetuneCancelled(RuntimeError):
    """Raised when ``should_stop`` asked training to stop; nothing was written."""


class BaseKeptWarning(UserWarning):
    """Fine-tuning kept (part of) the base model: no epoch beat it on the held-out data (the
    returned path and the card say so too; the Train widget reports it in its own words)."""


def user_models_dir() -> Path:
    """Where fine-tuned models go by default (the user's data folder for napari-wbc)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-wbc", appauthor=False)) / "models"


def list_user_models(kind: str = "segmenter") -> list[Path]:
    """Fine-tuned model files of ``kind`` in the user's data folder, newest first (a file that cannot
    be read - a broken card, a dangling link - is left out, never the others with it)."""
    from .models import read_card

    d = user_models_dir()
    out = []
    for p in d.glob("*.safetensors") if d.is_dir() else []:
        try:
            if read_card(p).get("kind") == kind:
                out.append((p.stat().st_mtime, p))
        except (ValueError, OSError):
            continue
    return [p for _, p in sorted(out, key=lambda t: t[0], reverse=True)]


def _new_output_path(kind_stem: str, folder: Path | None = None, tag: str = "ft") -> Path:
    """A new dated ``<kind_stem>_<tag>_<date-time>.safetensors`` in ``folder`` (default: the user's models)."""
    d = user_models_dir() if folder is None else Path(folder)
    from .io import free_path
    from .models import existing_model_file

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return free_path(d / f"{kind_stem}_{tag}_{stamp}.safetensors", lambda p: existing_model_file(p) is not None)


# a base card's record of how *it* was made and scored: not true of a model fine-tuned from it
BASE_PROVENANCE = ("training", "command", "data", "split", "train_fit", "note", "validation_last_weights_not_shipped")


# the sentences fine_tuned_card (and adapt_classifier) end a card's limits with
USER_SENTENCES = ("Fine-tuned by its user", "Adapted to the stain of")


def fine_tuned_card(new_card: dict, base_card: dict, n_images: int) -> dict:
    """Make a copied card describe the fine-tuned model, not its base (in place; returned).

    The base's own record (training, command, data, split, notes) moves under ``finetune.base_card``
    and its validation figures under ``finetune.base_validation`` (measured on the base, not on
    this model); the version says it is fine-tuned; ``finetune.environment`` records the versions.
    """
    ft = new_card.setdefault("finetune", {})
    moved = {k: new_card.pop(k) for k in BASE_PROVENANCE if k in new_card}
    if moved:
        ft["base_card"] = moved
    if "validation" in new_card:
        ft["base_validation"] = new_card.pop("validation")
    ft.setdefault("environment", environment())
    version = str(base_card.get("version") or base_card.get("name") or Path(str(ft.get("base", "unknown"))).stem)
    ft["base_version"] = version
    new_card["version"] = version if version.endswith("+finetuned") else f"{version}+finetuned"
    limits = str(base_card.get("limits") or "")
    for said in USER_SENTENCES:  # what a fine-tune or an adaptation of the base said about the base
        limits = limits.split(said)[0]
    limits = limits.strip()
    new_card["limits"] = ((limits + " ") if limits else "") + (
        f"Fine-tuned by its user on {n_images} image(s); its base's figures do not describe it.")
    return new_card


def environment() -> dict:
    """Versions a fine-tune ran with (for its card)."""
    import platform

    import torch

    from .. import __version__

    return {"napari_wbc": __version__, "torch": torch.__version__, "python": platform.python_version()}


def file_sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(path, card: dict) -> str:
    """The SHA-256 of model file ``path``: its card's ``weights_sha256``, which loading it
    (:func:`~napari_wbc.core.models.read_weights`) checked against the file, or for an older card
    without one, read from the file."""
    return str(card.get("weights_sha256") or file_sha256(path)).lower()


def data_sha256(arrays) -> str:
    """A fingerprint of the training arrays (shape, dtype and bytes of each, in order)."""
    from .io import array_digest

    return array_digest(arrays, algorithm="sha256", digest_size=None)


def paired_classifier(seg_path, card: dict) -> Path | None:
    """The classifier fine-tuned with a segmenter: the card's ``classifier`` (a file name beside the
    segmenter, or an older card's absolute path), else ``<stem>_classifier.safetensors`` beside it;
    None when there is none (a moved pair still finds its classifier beside it)."""
    seg_path = Path(seg_path)
    ref = card.get("classifier")
    candidates = []
    if ref:
        ref = Path(str(ref))
        candidates += [seg_path.parent / ref.name] if not ref.is_absolute() else [seg_path.parent / ref.name, ref]
    candidates.append(seg_path.with_name(seg_path.stem + "_classifier.safetensors"))
    return next((c for c in candidates if c.is_file() and c.with_suffix(".json").is_file()), None)


def classifier_for(segmenter) -> Path | None:
    """The classifier that types the cells of segmenter model file ``segmenter`` by default: the one
    fine-tuned with it (named in its card, see :func:`paired_classifier`); None for the shipped
    segmenter or one without a pair (the shipped classifier). The same in the widgets, the CLI and
    ``run_batch``."""
    from .models import read_card, resolve_model_path

    if segmenter is None:
        return None
    try:
        path = resolve_model_path(segmenter, "segmenter")
        card = read_card(path)
    except ValueError:
        return None  # loading the segmenter says what is wrong with it
    return paired_classifier(path, card) if card.get("classifier") else None

def default_classifier(segmenter) -> Path:
    """The classifier file that types the cells of ``segmenter`` when none is chosen: the one fine-tuned
    with it (:func:`classifier_for`), else the shipped one."""
    from .models import SHIPPED

    return Path(classifier_for(segmenter) or SHIPPED["classifier"])


def typing_classifier(typers, base) -> tuple[Path | None, Path, str]:
    """The classifier that corrected types fine-tune when none was chosen: the one that typed the cells
    (``typers``: the classifier file recorded for each set of corrected cells, None where not recorded)
    when they all name one file; else :func:`finetune`'s default, the one fine-tuned with segmenter
    ``base``, else the shipped one. Returns ``(classifier= for finetune, the file that is, why)``."""
    typers = set(typers)
    if len(typers) == 1 and None not in typers:
        one = Path(typers.pop())
        return one, one, "it typed them"
    why = "typed by several classifiers" if len(typers - {None}) > 1 else "not recorded which typed them"
    return None, default_classifier(base), why


def trained_classifier(seg_path) -> Path | None:
    """The classifier a :func:`finetune` with ``cell_types`` trained beside the segmenter ``seg_path``;
    None when types were not trained, or when the new one was no better and the card names the base
    classifier it kept (the Train widget and ``napari-wbc train`` report from this)."""
    from .models import read_card

    seg_path = Path(seg_path)
    try:
        card = read_card(seg_path)
    except ValueError:
        return None
    mine = paired_classifier(seg_path, card) if card.get("classifier") else None
    # this run's: written beside the segmenter under its name (not the base classifier it kept)
    return mine if mine is not None and mine.parent == seg_path.parent and mine.stem.startswith(seg_path.stem) else None


def types_outcome(classifier, shown: str | None = None) -> str:
    """What became of the corrected types after a fine-tune, for the Train widget and ``napari-wbc train``
    alike: ``classifier`` is :func:`trained_classifier`'s answer, ``shown`` how to name it (default: its path)."""
    if classifier is None:
        return ("the corrected types were not learned: the classifier trained on them was worse on the held-out "
                "corrected cells, the previous one is kept")
    return f"the classifier learned the corrected types: {shown or classifier}{holdout_text(classifier)}"


def holdout_text(classifier) -> str:
    """' (held-out accuracy a -> b on n cells)' from a fine-tuned classifier's card ('' if unknown): a tie
    on one held-out cell is not evidence that the corrections were learned."""
    from .models import read_card

    try:
        ft = read_card(classifier).get("finetune", {}) or {}
    except ValueError:
        return ""
    before, after, n = ft.get("holdout_accuracy_before"), ft.get("holdout_accuracy_after"), ft.get("n_holdout")
    if before is None or after is None or not n:
        return ""
    return (f" (held-out accuracy {before:.2f} -> {after:.2f} on {n} cell{'s' if n != 1 else ''}"
            + (": too few to tell)" if n < 3 else ")"))


def refuse_existing(path, what: str = "output") -> None:
    """ValueError naming the file when ``path``'s weights or card already exist."""
    from .models import existing_model_file

    taken = existing_model_file(path)
    if taken is not None:
        raise ValueError(f"{what} {str(taken)!r} exists; choose a new file name (models are never overwritten)")


def model_output_path(output, kind_stem: str = "wbc_unet", tag: str = "ft") -> Path:
    """Where a new model goes for ``output`` (a file name, or an existing folder: a new dated file
    ``<kind_stem>_<tag>_<date-time>`` in it). Raises ValueError when the ``.safetensors`` or its
    ``.json`` card already exists: nothing is ever overwritten."""
    from .models import SHIPPED, model_file

    out = Path(output).expanduser()
    if out.is_dir():
        return _new_output_path(kind_stem, out, tag)
    out = model_file(out)
    refuse_existing(out)
    if out.resolve() == SHIPPED["segmenter"].resolve():
        raise ValueError("output must not be the shipped model file")
    return out


def _as_labels(lab, i):
    from .io import mask_to_labels

    lab = np.asarray(lab)
    if lab.ndim != 2:
        raise ValueError(f"labels[{i}] has shape {lab.shape}; expected a 2-D label image")
    if lab.dtype.kind not in "uifb":
        raise ValueError(f"labels[{i}] has dtype {lab.dtype}; expected integer instance labels or a binary mask")
    if lab.size and lab.dtype != bool and lab.min() < 0:
        raise ValueError(f"labels[{i}] holds negative values; expected 0 = background, 1..N cells")
    if lab.dtype == bool or (lab.size and lab.max() <= 1):
        return mask_to_labels((lab != 0).astype(np.uint8))  # 0/1, or 0/0.5: non-zero is a cell
    if lab.size and lab.dtype.kind in "uif" and len(np.unique(lab[lab != 0])) == 1 and lab.min() >= 0:
        return mask_to_labels((lab != 0).astype(np.uint8))  # a binary mask of any value (0/255): split into cells
    if lab.dtype.kind == "f":
        if not np.all(np.mod(lab, 1) == 0):
            raise ValueError(f"labels[{i}] holds non-integer values; expected integer instance labels")
    if lab.min() < 0:
        raise ValueError(f"labels[{i}] holds negative values; expected 0 = background, 1..N cells")
    if lab.max() >= 2**31:  # ids past int32 (which would wrap to negative): numbered 1..N again
        from skimage.segmentation import relabel_sequential

        return relabel_sequential(lab.astype(np.int64) if lab.dtype.kind == "f" else lab)[0].astype(np.int32)
    return lab.astype(np.int32, copy=False)  # read only from here on: the caller's int32 labels as they are


def _best_record(history: list[dict]) -> dict | None:
    """The hold-out figures of the evaluation whose weights training kept: the first with the best
    matched Dice x F1 after the start (``train_segmenter`` keeps strictly better ones)."""
    metrics = ("matched_dice", "precision", "recall", "f1", "tp", "fp", "fn", "n_images")
    scored = [h for h in history[1:] if h.get("matched_dice") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda h: h["matched_dice"] * h["f1"])  # max keeps the first of equals
    return {k: best[k] for k in metrics if k in best}


def _check_typed_ids(types: dict, ids: np.ndarray, i: int) -> None:
    """ValueError naming the image when ``cell_types[i]`` types a label id its labels do not hold (a
    cell erased after it was typed)."""
    try:
        asked = np.array(sorted({int(k) for k in types}), np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"cell_types[{i}] has keys that are not label ids: {list(types)[:10]!r}") from None
    missing = asked[~np.isin(asked, ids)]
    if len(missing):
        raise ValueError(f"cell_types[{i}] types label id(s) {', '.join(map(str, missing[:10]))} that labels[{i}] "
                         "does not hold (erased or renumbered after typing?); type only cells that are there")


def image_label_lists(images, labels) -> tuple[list, list]:
    """``(images, labels)`` as two lists of one length (one image and its labels: lists of one); a
    ValueError when there is no image or the lengths differ."""
    if isinstance(images, np.ndarray) and images.ndim in (2, 3) and not isinstance(labels, (list, tuple)):
        images, labels = [images], [labels]
    images, labels = list(images), list(labels)
    if len(images) == 0:
        raise ValueError("images is empty; expected a list of at least one image")
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} label arrays; expected one label array per image")
    return images, labels


def _split_holdout(samples, rng):
    """(train, held out): about a quarter of the *cells* held out - whole images when some of them
    hold 15-40 % of the cells together, else a strip with ~25 % of the cells of the image that has
    most (one big corrected smear beside a small one was held out whole, and training had one cell)."""
    counts = [len(s.centres) for s in samples]
    total = sum(counts)
    if len(samples) >= 2 and total:
        held, n_held = [], 0
        for i in rng.permutation(len(samples)):
            if n_held + counts[i] <= 0.4 * total:
                held.append(int(i))
                n_held += counts[i]
                if n_held >= 0.15 * total:
                    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in held]
    k = int(np.argmax(counts))
    tr, va = _strip_holdout(samples[k])
    return samples[:k] + tr + samples[k + 1:], va


def _strip_holdout(s):
    """``([train], [held out])`` of one sample: a strip with ~25 % of its cells held out."""
    from .train import make_sample

    if len(s.centres) < 2:
        return [s], []  # nothing to hold out: train on all, keep the last epoch
    axis = 1 if s.labels.shape[1] >= s.labels.shape[0] else 0
    c = np.sort(s.centres[:, axis])
    cut = int(round((c[-max(1, len(c) // 4) - 1] + c[-max(1, len(c) // 4)]) / 2))
    sl_tr = (slice(None), slice(0, cut)) if axis else (slice(0, cut), slice(None))
    sl_va = (slice(None), slice(cut, None)) if axis else (slice(cut, None), slice(None))
    tr_lab, va_lab = s.labels[sl_tr].copy(), s.labels[sl_va].copy()
    # cells cut by the line: keep them out of both scores' ground truth
    both = np.intersect1d(np.unique(tr_lab), np.unique(va_lab))
    both = both[both > 0]
    w_tr = (~np.isin(tr_lab, both)).astype(np.float32)
    if s.weight is not None:
        w_tr *= s.weight[sl_tr]
    va_lab[np.isin(va_lab, both)] = 0
    tr = make_sample(s.rgb[sl_tr], tr_lab, diameter=s.diameter, weight=w_tr, name=s.name + "[train]")
    va = make_sample(s.rgb[sl_va], va_lab, diameter=s.diameter, name=s.name + "[holdout]")
    return [tr], ([va] if va_lab.max() > 0 else [])


def finetune(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    base=None,
    epochs: int | None = None,
    device=None,
    output=None,
    progress: Callable | None = None,
    cell_types: Sequence[dict] | None = None,
    should_stop: Callable[[], bool] | None = None,
    seed: int = 0,
    classifier=None,
) -> Path:
    """Fine-tune the WBC segmenter on corrected masks; return the new model file.

    Parameters
    ----------
    images : list of HxW / HxWx3 arrays (any size, as :func:`segment` takes).
    labels : matching list of instance label arrays (0 background, 1..N one per cell).
        A binary mask (bool, or a single non-zero value such as 0/1 or 0/255) is split
        into connected components; any other array is read as instance labels, so a
        mask file with several grey levels (a JPEG, or Tecom's 0/128/255 nucleus and
        cytoplasm) should be read with ``napari_wbc.core.io.read_mask`` first. An image
        whose labels hold no cell is left out, with a warning.
    base : None (shipped model) or a model path to start from.
    epochs : None = 12 (1 epoch = 25 steps of 8 crops, scored on the hold-out after each).
    device : None/"auto", "cpu", "cuda", "mps".
    output : path of the new ``.safetensors`` (or an existing folder: a new dated file in it);
        None = a new dated file in the user's data folder (never the working directory,
        never the shipped model). An existing file (or its ``.json`` card) is never overwritten.
    progress : callable ``(epoch, total_epochs, metrics_dict)``; ``metrics_dict["stage"]`` is
        ``"segmenter"``, then ``"classifier"`` while the classifier trains on ``cell_types``
        (its own epochs, with ``holdout_accuracy`` and ``before_accuracy``).
    cell_types : optional list (one per image) of ``{label: cell_type}``; when given
        the classifier is fine-tuned the same way and its file is written beside the
        segmenter with ``_classifier`` in the name (its path is in the segmenter card
        under ``"classifier"``). Cells typed ``"other"`` (by hand) are accepted: their
        outlines train the segmenter as every cell's do, but they are no classifier example.
    should_stop : callable returning True to cancel; raises FinetuneCancelled and
        writes nothing.
    classifier : with ``cell_types``, the classifier they fine-tune: None = the one paired with
        ``base`` (a fine-tuned pair), else the shipped one; or a classifier model file, e.g. one
        adapted to the lab's stain (:func:`~napari_wbc.adapt_classifier`; adapting first, then
        fine-tuning on corrected types, measured better than fine-tuning the unadapted one:
        docs/benchmarks.md).

    Returns the path of the new model, or the base model's path when no epoch
    beat it on the internal hold-out (a warning says so). With ``cell_types``, a
    segmenter that did not improve keeps the base model's weights in the new file
    (card: ``finetune.kept_base_weights``) beside the trained classifier; when
    neither improved, the base model's path comes back.
    """
    t_start = time.time()
    from .device import resolve_device
    from .models import build_from_card, read_card, read_weights, resolve_model_path, save_model
    from .segment import check_image, in_colour, label_areas
    from .train import evaluate, make_sample, train_segmenter

    images, labels = image_label_lists(images, labels)
    if cell_types is not None and len(cell_types) != len(images):
        raise ValueError(f"cell_types has {len(cell_types)} entries; expected one mapping per image ({len(images)})")
    samples, as_labels = [], []
    n_cells = 0

    def check_stop():  # between the steps of preparing the data (tens of seconds each on a big smear)
        if should_stop is not None and should_stop():
            raise FinetuneCancelled("fine-tuning was cancelled; no model file was written") from None

    base_path = resolve_model_path(base, "segmenter")
    card = read_card(base_path)
    for i, (im, lab) in enumerate(zip(images, labels)):
        check_stop()
        rgb = in_colour(check_image(im), card)  # a greyscale camera's smear: as segment() shows it
        lab = _as_labels(lab, i)
        as_labels.append(lab)  # (the classifier's cells come from the same labels)
        if lab.shape != rgb.shape[:2]:
            raise ValueError(f"labels[{i}] has shape {lab.shape} but images[{i}] is {rgb.shape[:2]}; they must match")
        if min(rgb.shape[:2]) < 16:
            raise ValueError(f"images[{i}] of shape {rgb.shape[:2]} is too small to train on; expected at least 16x16")
        ids = label_areas(lab)[0]  # (no sort of a big smear's labels)
        if cell_types is not None and isinstance(cell_types[i], dict) and cell_types[i]:
            _check_typed_ids(cell_types[i], ids, i)  # now, not after minutes of training the segmenter
        if len(ids) == 0:  # said, not silently dropped (fine-tuning on such fields added false WBCs:
            # docs/benchmarks.md, "Fields without any WBC as corrections")
            warnings.warn(f"labels[{i}] hold no cell: images[{i}] is left out (a field without any WBC is "
                          "not learned from)", stacklevel=2)
            continue
        n_cells += len(ids)
        samples.append(make_sample(rgb, lab, name=f"image {i}"))
    if not samples:
        raise ValueError("no labelled pixel in any of the label arrays; paint or keep at least one cell")

    if card.get("kind") != "segmenter":
        raise ValueError(f"base model {str(base_path)!r} is a {card.get('kind')}, expected a segmenter")
    out_path = _new_output_path("wbc_unet") if output is None else model_output_path(output)
    auto_name = output is None or Path(output).expanduser().is_dir()  # a dated name of ours, not the user's

    cls_path = cls_base = None
    if cell_types is not None:  # checked now, not after minutes of training the segmenter
        from .classifier_finetune import check_cell_types

        cls_path = out_path.with_name(out_path.stem + "_classifier.safetensors")
        refuse_existing(cls_path, "classifier output")
        # the classifier given, else the one that goes with the base segmenter (a fine-tuned pair: the one
        # that types with it in napari, the CLI and the batch), else the shipped one
        cls_base = classifier_for(base_path) if classifier is None else classifier
        check_cell_types(cell_types, read_card(resolve_model_path(cls_base, "classifier"), "classifier"))
    elif classifier is not None:
        raise ValueError("classifier= is the classifier that cell_types fine-tune; give cell_types too (or leave it None)")

    dev = resolve_device(device)
    net = build_from_card(card, base_path)
    base_state = read_weights(base_path, card)  # kept: a segmenter that does not improve goes back to it
    net.load_state_dict(base_state)
    net.to(dev)
    rng = np.random.default_rng(seed)
    check_stop()
    train, val = _split_holdout(samples, rng)
    if epochs is None:
        epochs = DEFAULT_EPOCHS
    epochs = int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    t0 = time.time()
    from .train import Stopped

    try:
        before = evaluate(net, card, val, dev, should_stop) if val else None
    except Stopped:  # (should_stop said so)
        check_stop()
        raise

    def _progress(step, steps, rec):
        if progress is not None:
            progress(step // STEPS_PER_EPOCH, epochs, {**rec, "stage": "segmenter",
                                                       "before_dice": before["matched_dice"] if before else None})

    best_state, history = train_segmenter(
        net, card, train, val, steps=epochs * STEPS_PER_EPOCH, batch_size=BATCH_SIZE, lr=LEARNING_RATE,
        eval_every=STEPS_PER_EPOCH, device=dev, seed=seed, field_norm=FIELD_NORM, empty_share=EMPTY_SHARE,
        small_field=SMALL_FIELD, progress=_progress,
        should_stop=should_stop, baseline=before, log=lambda s: None,
    )
    check_stop()
    kept_base = bool(val) and best_state is None
    if kept_base:
        if cell_types is None:
            warnings.warn(
                f"fine-tuning did not improve on the base model on the held-out data "
                f"(matched Dice x F1 before {before['matched_dice'] * before['f1']:.3f}); keeping the base model {base_path.name}",
                BaseKeptWarning, stacklevel=2,
            )
            return base_path
        # the corrected types still train the classifier; the outlines stay the base model's
        warnings.warn(
            f"fine-tuning the segmenter did not improve on the base model on the held-out data; the new model "
            f"keeps {base_path.name}'s segmentation weights (only the classifier is trained)",
            BaseKeptWarning, stacklevel=2,
        )
        net.load_state_dict(base_state)
    elif best_state is not None:
        net.load_state_dict(best_state)
    # the kept weights' hold-out figures, as measured in training (evaluating them again gives the same)
    after = None if not val else (before if best_state is None else
                                  _best_record(history) or evaluate(net, card, val, dev))
    new_card = dict(card)
    new_card.update({
        "name": out_path.stem,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "finetune": {
            "base": str(base_path),
            "base_sha256": weights_sha256(base_path, card),
            "data_sha256": data_sha256([*images, *labels]),
            "seed": seed,
            "learning_rate": LEARNING_RATE,
            "batch_size": BATCH_SIZE,
            "n_images": len(samples),
            "n_cells": int(n_cells),
            "n_holdout_images": len(val),
            "holdout": [v.name for v in val],
            "epochs": epochs,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "device": str(dev),
            "wall_time_s": round(time.time() - t_start, 1),  # preparing the data too (the classifier: its card)
            "train_time_s": round(time.time() - t0, 1),
            "holdout_before": before,
            "holdout_after": after,
            "kept_base_weights": kept_base,
            "history": history,
        },
    })
    fine_tuned_card(new_card, card, len(samples))
    if cell_types is not None:
        from .classifier_finetune import finetune_classifier

        got = finetune_classifier(images, as_labels, cell_types, base=cls_base, output=cls_path, device=dev,
                                  should_stop=should_stop, unique=auto_name, seed=seed,
                                  progress=None if progress is None else
                                  lambda ep, n, rec: progress(ep, n, {**rec, "stage": "classifier"}))
        if kept_base and Path(got).resolve() == resolve_model_path(cls_base, "classifier").resolve():
            return base_path  # neither network improved: nothing new to write (both warnings said so)
        # beside the segmenter: by file name, so the pair can be moved or copied together
        new_card["classifier"] = Path(got).name if Path(got).parent == out_path.parent else str(got)
    # a default (dated) name taken meanwhile by another run gets _2, _3...: never replaced
    return save_model(net, new_card, out_path, unique=auto_name)
