"""Fine-tuning the cell-type classifier from corrected types (``finetune(cell_types=...)``)."""
from __future__ import annotations

import datetime
import time
import warnings
from pathlib import Path

import numpy as np

from .classify import OTHER


def corrected_types(table) -> dict[int, str]:
    """``{label: type}`` of the rows of a per-cell table (a labels layer's features, or the ``x_cells.csv``
    saved with them) whose type was set by hand: ``corrected`` true (a bool, or its text in a CSV) and a
    ``cell_type``. Empty when the table has neither column. Unknown types are left for the caller to refuse."""
    if table is None or not {"corrected", "cell_type"} <= set(table.columns):
        return {}
    ids = table["label"] if "label" in table.columns else table.get("index")
    corrected = table["corrected"].astype(str).str.strip().str.lower().isin(["true", "1", "1.0", "yes"])
    return {int(i): t.strip() for i, t, c in zip(ids, table["cell_type"], corrected)
            if c and isinstance(t, str) and t.strip()}


def present_ids(labels, ids) -> set[int]:
    """Which of a few ``ids`` occur in ``labels`` (a few million pixels at a time, no sort of the array)."""
    wanted = np.asarray(sorted(set(ids)), np.int64)
    found = np.zeros(len(wanted), bool)
    flat = np.asarray(labels).reshape(-1)
    for s in range(0, flat.size, 1 << 22):
        chunk = flat[s:s + (1 << 22)]
        found |= np.isin(wanted, chunk)
        if found.all():
            break
    return {int(i) for i in wanted[found]}


def check_cell_types(cell_types, card) -> None:
    """Raise a ValueError unless every ``cell_types`` entry names a type the classifier ``card`` knows
    (or ``other``: accepted, not an example for the classifier), at least one cell of the card's types
    is typed, and some can be held out to check the result (at least 4, with 2 of one type:
    :func:`holdout_indices`) - checked before any training starts."""
    classes = _card_classes(card)
    n = n_other = 0
    for i, types in enumerate(cell_types):
        if types is None:
            continue
        if not isinstance(types, dict):
            raise ValueError(f"cell_types[{i}] is a {type(types).__name__}; expected a mapping {{label: type}}")
        for k, t in types.items():
            if t not in classes and t != OTHER:
                raise ValueError(f"cell_types[{i}][{k!r}] = {t!r} is not a known type "
                                 f"({', '.join([*classes, OTHER])})")
        n_other += sum(t == OTHER for t in types.values())
        n += len(types)
    if n == n_other:
        raise ValueError("cell_types names no cell" + (f" of the classifier's types ({n_other} {OTHER}, which it "
                                                       "does not learn)" if n_other else "")
                         + "; expected {label: type} for at least one labelled cell")
    y = np.array([classes.index(t) for types in cell_types if types for t in types.values() if t != OTHER])
    if len(holdout_indices(y, np.random.default_rng(0))) == 0:
        per_type = ", ".join(f"{int((y == c).sum())} {classes[c]}" for c in np.unique(y))
        raise ValueError(
            f"too few corrected cells to check a new classifier on ({per_type}): at least 4, with 2 of one "
            "type, are needed (some are held out to check the result; a classifier fine-tuned on fewer could "
            "be far worse and nothing would show it)")


def cells_inputs(images, labels, card, ids=None, *, should_stop=None, progress=None, stopped=None) -> np.ndarray:
    """Network inputs (N x C x S x S, float32) of cells of ``images``, as :func:`~.classify.classify`
    makes them for ``card``'s classifier: per image the ids ``ids[i]`` (sorted; None or ``ids=None``:
    every labelled cell; an empty list: none). ``should_stop`` is asked per image (``stopped()`` gives
    the exception to raise); ``progress(done, total)`` after each image."""
    from .classify import _check_labels, _regions, cell_input, image_normaliser, input_settings
    from .segment import check_image

    settings, norm_spec = input_settings(card)
    xs = []
    for i, (im, lab) in enumerate(zip(images, labels)):
        if should_stop is not None and should_stop():
            raise stopped()
        want = None if ids is None else ids[i]
        if want is None or len(want):
            try:
                rgb = check_image(im)
            except ValueError as e:
                raise ValueError(f"images[{i}]: {e}") from None
            lab = np.asarray(lab)
            if lab.shape != rgb.shape[:2]:
                raise ValueError(f"labels[{i}] has shape {lab.shape} but images[{i}] is {rgb.shape[:2]}")
            lab = _check_labels(lab, rgb.shape[:2])  # integers as they are (an int64 copy of a big layer: 8 B/px)
            found, slices, areas = _regions(lab, want)
            if len(found):
                norm = image_normaliser(rgb, norm_spec)
                xs += [cell_input(rgb, norm, lab, int(cid), slices[j], areas[j], **settings)
                       for j, cid in enumerate(found)]
        if progress is not None:
            progress(i + 1, len(images))
    if not xs:
        return np.zeros((0, 0, 0, 0), np.float32)
    return np.stack(xs).astype(np.float32)


def _cell_inputs(images, labels, cell_types, card):
    """Network inputs (N x 4 x S x S) and class indices of every typed cell but those typed ``other``
    (types checked by :func:`check_cell_types`)."""
    classes = _card_classes(card)
    typed = [{int(k): t for k, t in (types or {}).items() if t != OTHER} for types in cell_types]
    ids = [sorted(t) for t in typed]
    x = cells_inputs(images, labels, card, ids)
    if not len(x):
        raise ValueError("cell_types names no cell; expected {label: type} for at least one labelled cell")
    ys = [classes.index(t[k]) for t, i in zip(typed, ids) for k in i]
    return x, np.asarray(ys, np.int64)


def _augment(x, rng):
    """Quarter turns, flips and a small colour change of the RGB channels (not the mask)."""
    x = np.rot90(x, rng.integers(4), axes=(1, 2))
    if rng.random() < 0.5:
        x = x[:, :, ::-1]
    x = x.copy()
    x[:3] = x[:3] * rng.uniform(0.9, 1.1, (3, 1, 1)).astype(np.float32) + rng.uniform(-0.05, 0.05, (3, 1, 1)).astype(np.float32)
    return x


# Fine-tuning on a lab's corrections also pulls the network toward its base's own calls on the same
# cells (learning without forgetting): the corrected cells are mostly of one or two types, and without
# this the network learned "everything is one of those" (docs/benchmarks.md, "Corrections from an unseen lab").
DISTILL_WEIGHT = 1.0
DISTILL_TEMPERATURE = 2.0


def distillation_loss(student_logits, teacher_logits, temperature: float = DISTILL_TEMPERATURE):
    """KL(teacher || student) of the class probabilities softened by ``temperature``, times its square
    (so its gradients keep their scale whatever the temperature): 0 when the two agree."""
    import torch

    t = float(temperature)
    target = torch.softmax(teacher_logits.detach().float() / t, 1)
    log_p = torch.log_softmax(student_logits.float() / t, 1)
    return torch.nn.functional.kl_div(log_p, target, reduction="batchmean") * t * t


def _card_classes(card: dict) -> list[str]:
    from .classify import CLASSES

    return list(card.get("classes") or CLASSES)


def holdout_indices(y: np.ndarray, rng) -> np.ndarray:
    """Typed cells held out to check a fine-tuned classifier: a quarter of each type (rounded down);
    when that is none but there are at least 4 cells, one cell of each type that has 2 or more (at
    most a quarter of all cells, the most common types first). Empty when fewer than 4 cells or
    every type has a single cell."""
    if len(y) < 4:
        return np.array([], int)
    by_type = {int(c): rng.permutation(np.nonzero(y == c)[0]) for c in np.unique(y)}
    val = [i for idx in by_type.values() for i in idx[: len(idx) // 4]]
    if not val:
        common = sorted((c for c, idx in by_type.items() if len(idx) >= 2), key=lambda c: -len(by_type[c]))
        val = [int(by_type[c][0]) for c in common[: max(1, len(y) // 4)]]
    return np.array(sorted(val), int)


def finetune_classifier(images, labels, cell_types, *, base=None, output, device=None, epochs=None,
                        should_stop=None, seed: int = 0, unique: bool = False, progress=None) -> Path:
    """Fine-tune the classifier on ``cell_types`` (per image ``{label: type}``; cells typed ``other`` are
    left out); return the model path.

    A stratified ~25% of the typed cells is held out (when there are at least 4);
    the best epoch by hold-out accuracy is kept, and the base model's path comes
    back (with a warning) when no epoch beat it. ``output`` must not exist (with ``unique``, a
    name taken by the time the model is saved gets ``_2``, ``_3``...). ``epochs``: default 10,
    each a pass over the typed cells (not the segmenter's epochs). ``progress``: optional callable
    ``(epoch, epochs, metrics)`` with ``holdout_accuracy``, ``before_accuracy`` and ``loss``.
    """
    import torch
    from .device import resolve_device
    from .finetune import BaseKeptWarning, FinetuneCancelled
    from .finetune import refuse_existing
    from .models import build_from_card, forward_pass, read_card, read_weights, resolve_model_path, save_model

    output = Path(output)
    refuse_existing(output)
    base_path = resolve_model_path(base, "classifier")
    card = read_card(base_path)
    check_cell_types(cell_types, card)
    x, y = _cell_inputs(images, labels, cell_types, card)
    rng = np.random.default_rng(seed)
    val_idx = holdout_indices(y, rng)  # not empty: check_cell_types saw to it
    tr_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    net = build_from_card(card, base_path)
    net.load_state_dict(read_weights(base_path, card))
    net.to(dev)

    def accuracy():
        if len(val_idx) == 0:
            return None
        net.eval()
        with torch.inference_mode():
            with forward_pass():
                p = net(torch.from_numpy(x[val_idx]).to(dev)).argmax(1).cpu().numpy()
        return float((p == y[val_idx]).mean())

    before = accuracy()
    best, best_state = before if before is not None else -1.0, None
    epochs = int(epochs) if epochs is not None else 10
    if progress is not None:
        progress(0, epochs, {"holdout_accuracy": None, "before_accuracy": before, "loss": None})
    steps = max(4, int(np.ceil(len(tr_idx) / 16)) * 4)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=1e-4)
    counts = np.bincount(y[tr_idx], minlength=int(y.max()) + 1).astype(np.float64)
    wts = 1.0 / np.maximum(counts[y[tr_idx]], 1)  # class-balanced sampling
    wts /= wts.sum()
    t0 = time.time()
    history = []
    teacher = None
    if DISTILL_WEIGHT > 0:  # the base as it is, frozen
        import copy

        teacher = copy.deepcopy(net).eval().requires_grad_(False)
    for ep in range(1, epochs + 1):
        net.train()
        for _ in range(steps):
            if should_stop is not None and should_stop():
                raise FinetuneCancelled("classifier fine-tuning was cancelled; no model file was written")
            b = rng.choice(tr_idx, size=min(16, len(tr_idx) * 2), p=wts)
            xb = torch.from_numpy(np.stack([_augment(x[i], rng) for i in b])).to(dev)
            with forward_pass():
                logits = net(xb)
                loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[b]).to(dev))
                if teacher is not None:
                    with torch.no_grad():
                        taught = teacher(xb)
                    loss = loss + DISTILL_WEIGHT * distillation_loss(logits, taught, DISTILL_TEMPERATURE)
                opt.zero_grad()
                loss.backward()
                opt.step()
        acc = accuracy()
        history.append({"epoch": ep, "loss": float(loss.detach()), "holdout_accuracy": acc})
        if progress is not None:
            progress(ep, epochs, {**history[-1], "before_accuracy": before})
        # at least as good as the base on the held-out cells (ties: the later epoch, which learned the
        # corrections longer): mostly confirmed cells the base already got right must not block learning
        if acc >= best:
            best = acc
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if best_state is None:
        warnings.warn(f"the classifier fine-tuned on the corrected types was worse than its base on the held-out "
                      f"cells in every epoch (base accuracy {before:.2f}); keeping {base_path.name}", BaseKeptWarning,
                      stacklevel=2)
        return base_path
    net.load_state_dict(best_state)
    from .finetune import data_sha256, fine_tuned_card, weights_sha256

    new_card = dict(card)
    new_card.update({
        "name": output.stem,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "finetune": {"base": str(base_path), "base_sha256": weights_sha256(base_path, card),
                     "data_sha256": data_sha256([*images, *labels]), "seed": seed, "learning_rate": 3e-4,
                     "distillation": {"weight": DISTILL_WEIGHT, "temperature": DISTILL_TEMPERATURE},
                     "cell_types": [{str(k): v for k, v in t.items()} for t in cell_types],
                     "n_cells": int(len(y)), "n_holdout": int(len(val_idx)),
                     "n_other": sum(t == OTHER for types in cell_types if types for t in types.values()),
                     "epochs": epochs, "holdout_accuracy_before": before, "holdout_accuracy_after": best if len(val_idx) else None,
                     "wall_time_s": round(time.time() - t0, 1), "history": history},
    })
    fine_tuned_card(new_card, card, len(images))
    return save_model(net.cpu(), new_card, output, unique=unique)
