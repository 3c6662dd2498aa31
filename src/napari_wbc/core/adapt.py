"""Adapting the cell-type classifier to a lab's stain without any typed cell.

A classifier's first batch-norm layers hold the mean and variance of what its first convolutions
see over the training cells; a new lab's stain shifts them. :func:`adapt_classifier` re-estimates
the batch norms of the first convolution block on the lab's own cells (AdaBN), weighting each cell
by its predicted type so that the predicted types count alike: a smear is mostly neutrophils, and
unweighted statistics follow that mix rather than the stain (they cost 0.06-0.08 balanced accuracy
on labs the classifier knew). Weights and every other layer are unchanged; the result is a new
classifier file beside its card. Why one block, with these weights: docs/benchmarks.md, "Adapting
to a lab's stain from its own cells".
"""
from __future__ import annotations

import copy
import datetime
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# the mix of types the shipped classifiers were trained on (class-balanced over the 4 common types,
# basophils a small share): the adapted statistics are those of this mix of the lab's cells
TRAINING_MIX = {"neutrophil": 0.2375, "lymphocyte": 0.2375, "monocyte": 0.2375, "eosinophil": 0.2375,
                "basophil": 0.05}
DEPTH = 1  # convolution blocks whose batch norms are re-estimated
ROUNDS = 3  # predict, weight, re-estimate
MIN_CELLS = 50  # a safety floor: 25-299 random cells gave the same gain (docs/benchmarks.md "How many cells")
SHARE_FLOOR = 0.02  # a type predicted for almost no cell is not blown up by 1 / share
RESAMPLE = 4  # cells drawn (with replacement, by weight) per cell, for the weighted statistics
BATCH = 64


class AdaptCancelled(Exception):
    """should_stop() said so; nothing was written."""


def first_batch_norms(net, depth: int = DEPTH) -> list:
    """The BatchNorm layers of the first ``depth`` convolution blocks of each SmallCNN in ``net``
    (an Ensemble's members each); a ValueError when the network has none there."""
    from torch import nn

    out = []
    for member in getattr(net, "members", [net]):
        feats = getattr(member, "features", None)
        blocks = [m for m in feats if isinstance(m, nn.Sequential)] if feats is not None else []
        for block in blocks[:depth]:
            out += [m for m in block if isinstance(m, nn.BatchNorm2d)]
    if not out:
        raise ValueError(f"this classifier ({type(net).__name__}) has no batch norm in its first convolution "
                         "blocks; only the SmallCNN classifiers (and ensembles of them) can be adapted")
    return out


def balanced_draws(probs: np.ndarray, classes: Sequence[str], n: int, seed: int = 0) -> np.ndarray:
    """``n`` cell indices drawn with replacement, each cell's chance ``sum_c p_ic t_c / max(q_c, floor)``
    (``q_c`` the mean predicted probability of type ``c``, ``t_c`` the training mix): the predicted
    types then count as in training."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.array([TRAINING_MIX.get(c, 0.0) for c in classes])
    t = t / t.sum()
    w = p @ (t / np.maximum(p.mean(0), SHARE_FLOOR))
    return np.random.default_rng(seed).choice(len(p), size=n, replace=True, p=w / w.sum())


def _statistics(base, x, depth: int, seed: int, should_stop, idx=None):
    """A copy of ``base`` whose first ``depth`` blocks' batch norms hold the statistics of the cells
    ``x[idx]`` (all of ``x`` without ``idx``; cumulative average over batches of :data:`BATCH` in a fixed
    random order; a draw is indexed batch by batch, never copied whole)."""
    import torch

    a = copy.deepcopy(base).eval()
    norms = first_batch_norms(a, depth)
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    idx = torch.arange(len(x)) if idx is None else torch.as_tensor(idx)
    order = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    with torch.no_grad():
        for i in range(0, len(order), BATCH):
            if should_stop is not None and should_stop():
                raise _cancelled()
            a(x[order[i:i + BATCH]])
    return a.eval()


def _probabilities(net, x):
    import torch

    with torch.no_grad():
        return torch.cat([torch.softmax(net(x[i:i + 256]).float(), 1) for i in range(0, len(x), 256)]).numpy()


def adapted_network(net, x, classes, *, depth: int = DEPTH, rounds: int = ROUNDS, seed: int = 0,
                    should_stop: Callable[[], bool] | None = None, progress: Callable | None = None,
                    probs=None):
    """``net`` (eval mode, float32, on CPU) adapted on the cells' network inputs ``x`` (N x C x S x S
    tensor): ``rounds`` times, type the cells with the network adapted so far, then re-estimate the
    first ``depth`` blocks' batch norms on a draw of the cells weighted by those types
    (:func:`balanced_draws`). Returns a new network; ``net`` is not changed. ``probs``: ``net``'s
    probabilities for ``x`` when the caller has them already (the first round's)."""
    cur = net
    for r in range(rounds):
        p = probs if r == 0 and probs is not None else _probabilities(cur, x)
        idx = balanced_draws(p, classes, RESAMPLE * len(x), seed=seed + r)
        cur = _statistics(net, x, depth, seed + r, should_stop, idx=idx)
        if progress is not None:
            progress(r + 1, rounds)
    return cur


def adapt_classifier(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    model=None,
    output=None,
    seed: int = 0,
    progress: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Adapt the classifier to the stain of ``images`` from their labelled cells; return the new file.

    No cell needs a type: the batch norms of the classifier's first convolution block are
    re-estimated on these cells, each weighted by its predicted type so that the types count as in
    training (see the module's docstring). Give all the cells of a lab's batch (at least
    :data:`MIN_CELLS`; e.g. every smear of one staining run, segmented), then type them with the file
    this returns (``classify(model=...)``, the Classify widget, ``napari-wbc segment --classifier``).
    It is an option for a lab whose stain is unlike the training sets', not a default: check its
    calls on cells you know (docs/models.md).

    Parameters
    ----------
    images : list of HxW / HxWx3 smears of one lab (any size).
    labels : matching list of instance labels (0 background, 1..N one per WBC), e.g. from ``segment``.
    model : the classifier to adapt: None (shipped), a shipped name or a ``.safetensors`` file.
    output : path of the new ``.safetensors`` (or an existing folder: a new dated file in it); None =
        a new dated file in the user's data folder. An existing file is never overwritten.
    progress : callable ``(done, total, stage)``: ``"cells"`` per image, then ``"rounds"``.
    should_stop : callable returning True to cancel (AdaptCancelled; nothing is written).
    """
    from .classifier_finetune import cells_inputs
    from .finetune import data_sha256, image_label_lists

    images, labels = image_label_lists(images, labels)
    job = AdaptJob(model=model, output=output)
    x = cells_inputs(images, labels, job.card, should_stop=should_stop,
                     progress=None if progress is None else lambda i, n: progress(i, n, "cells"),
                     stopped=_cancelled)
    return job.run(x, n_images=len(images), data_sha256=data_sha256([*images, *labels]), seed=seed,
                   progress=progress, should_stop=should_stop)


def _cancelled():
    return AdaptCancelled("adapting the classifier was cancelled; no model file was written")


class AdaptJob:
    """The classifier to adapt and where the result goes, checked before any cell is prepared (so a
    caller that gathers cells image by image, as ``napari-wbc adapt`` does, fails early)."""

    def __init__(self, *, model=None, output=None):
        from .finetune import _new_output_path, model_output_path
        from .models import build_from_card, read_card, read_weights, resolve_model_path

        self.base_path = resolve_model_path(model, "classifier")
        self.card = read_card(self.base_path, "classifier")
        net = build_from_card(self.card, self.base_path)
        net.load_state_dict(read_weights(self.base_path, self.card))
        self.net = net.float().eval()
        first_batch_norms(self.net)  # (a network that cannot be adapted: said before the cells are prepared)
        self.out_path = (_new_output_path("wbc_classifier", tag="adapted") if output is None
                         else model_output_path(output, "wbc_classifier", tag="adapted"))
        self.auto_name = output is None or Path(output).expanduser().is_dir()

    def run(self, x: np.ndarray, *, n_images: int, data_sha256: str | None = None, seed: int = 0,
            progress: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> Path:
        """Adapt on the cells' network inputs ``x`` (from ``cells_inputs`` with this job's card) and
        save the new classifier; returns its path."""
        t0 = time.time()
        import torch

        from .finetune import environment, fine_tuned_card, weights_sha256
        from .models import save_model

        if len(x) < MIN_CELLS:
            raise ValueError(f"the labels hold {len(x)} cells; adapting to a stain needs at least {MIN_CELLS} "
                             "(the statistics of fewer are noise): give more smears of the lab")
        classes = list(self.card.get("classes") or TRAINING_MIX)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        torch.manual_seed(seed)
        first = _probabilities(self.net, xt)  # the base's calls: the card's "before" and the first round's weights
        before = first.argmax(1)
        adapted = adapted_network(self.net, xt, classes, seed=seed, should_stop=should_stop, probs=first,
                                  progress=None if progress is None else lambda r, n: progress(r, n, "rounds"))
        after = _probabilities(adapted, xt).argmax(1)
        if should_stop is not None and should_stop():
            raise _cancelled()

        def counts(pred):
            return {c: int((pred == i).sum()) for i, c in enumerate(classes)}

        card = self.card
        new_card = dict(card)
        new_card.update({
            "name": self.out_path.stem,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "finetune": {
                "method": (f"adapted to a stain: the batch norms of the first {DEPTH} convolution block re-estimated "
                           f"on the lab's cells, each weighted by its predicted type ({ROUNDS} rounds); no type "
                           "given, every weight unchanged"),
                "base": str(self.base_path), "base_sha256": weights_sha256(self.base_path, card),
                "data_sha256": data_sha256, "seed": seed, "n_images": int(n_images), "n_cells": int(len(x)),
                "types_before": counts(before), "types_after": counts(after),
                "wall_time_s": round(time.time() - t0, 1), "environment": environment(),
            },
        })
        fine_tuned_card(new_card, card, n_images)
        base_version = new_card["finetune"]["base_version"]  # (an adapted base is adapted again, once more)
        new_card["version"] = base_version if base_version.endswith("+adapted") else f"{base_version}+adapted"
        new_card["limits"] = new_card["limits"].replace("Fine-tuned by its user on", "Adapted to the stain of")
        return save_model(adapted, new_card, self.out_path, unique=self.auto_name)
