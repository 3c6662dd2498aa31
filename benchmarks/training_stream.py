"""Fingerprint the segmenter's training stream: does a code change alter what a recipe trains on?

    python benchmarks/training_stream.py --out /tmp/stream_now.json
    PYTHONPATH=<old checkout>/src python benchmarks/training_stream.py --out /tmp/stream_old.json --compare /tmp/stream_now.json

Reads the recipe from a segmenter's card (``--card``, default the shipped one: its ``training.args``),
prepares the training samples as ``train_segmenter.py`` does (its data, rescaled to the network's scale,
red-cell points when the recipe draws red-cell fields), then draws ``--batches`` batches with the recipe's
crop options, batch size and seed, and records a SHA-1 of every sample and of chosen batches. Equal
fingerprints mean the same crops reach the network (the optimiser then gives the same weights on the same
torch); the first differing batch says where a change starts to matter. A few minutes on one thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_segmenter as TS  # noqa: E402

from napari_wbc.core import train as T  # noqa: E402
from napari_wbc.core.io import atomic_write  # noqa: E402

SHIPPED_CARD = Path(__file__).resolve().parents[1] / "src/napari_wbc/models/wbc_unet.json"
CHECKPOINTS = (1, 2, 5, 10, 50, 100, 250, 500, 1000, 2500)


def _sha(a) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha1(a.tobytes() + f"{a.dtype}{a.shape}".encode()).hexdigest()[:16]


def sample_print(s) -> dict:
    """One hash per field of a prepared training sample (arrays by their bytes, the rest by value)."""
    out = {}
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        out[f.name] = _sha(v) if isinstance(v, np.ndarray) else repr(v)
    return out


def recipe(card: dict) -> dict:
    """(crop options, batch size, seed, target diameter, all arguments) of the card's training run."""
    args = card.get("training", {}).get("args")
    if not isinstance(args, dict):
        raise SystemExit("--card: the card has no training.args (not made by benchmarks/train_segmenter.py)")
    a = TS.with_defaults(args)
    return {"crop": TS.crop_options(a), "batch": int(a["batch"]), "seed": int(a["seed"]),
            "target": float(card.get("target_diameter", T.TARGET_DIAMETER)), "args": a}


def supported(options: dict) -> dict:
    """The crop options the code on the path takes (an older checkout predates some): those it lacks must
    be at their default, as every run before the option trained; otherwise SystemExit naming them."""
    import inspect

    taken = set(inspect.signature(T.random_crop).parameters) | set(inspect.signature(T.make_batch).parameters)
    defaults = TS.crop_options({})  # (every option at its default)
    missing = [k for k in options if k not in taken and options[k] != defaults[k]]
    if missing:
        raise SystemExit(f"the code on the path predates the recipe's option(s) {missing}: it cannot make this stream")
    return {k: v for k, v in options.items() if k in taken}


def prepare(sample, target: float, empty_share: float):
    """The sample as the code on the path prepares it for training (``core.train.prepare_sample``; in
    checkouts before that function, the same two steps it takes)."""
    if hasattr(T, "prepare_sample"):
        return T.prepare_sample(sample, target, empty_share)
    s = T.rescaled(sample, target)
    return T.with_empty_points(s) if empty_share > 0 else s


def fingerprint(rec: dict, batches: int, log=print) -> dict:
    train, bccd = TS.training_data(rec["args"])
    opts = supported(rec["crop"])
    samples = [prepare(s, rec["target"], opts.get("empty_share", 0.0)) for s in train + bccd]
    rng = np.random.default_rng(rec["seed"])
    res = {"recipe": rec, "samples": [sample_print(s) for s in samples], "batches": {}}
    for i in range(1, batches + 1):
        b = T.make_batch(samples, rng, rec["batch"], target=rec["target"], **opts)
        if i in CHECKPOINTS or i == batches:
            res["batches"][str(i)] = hashlib.sha1(b"".join(t.numpy().tobytes() for t in b)).hexdigest()[:16]
            log(f"batch {i}: {res['batches'][str(i)]}")
    return res


def compare(a: dict, b: dict) -> list[str]:
    """Where two fingerprints differ, in words (empty: the same stream)."""
    diffs = []
    if len(a["samples"]) != len(b["samples"]):
        diffs.append(f"{len(a['samples'])} against {len(b['samples'])} training samples")
    for i, (x, y) in enumerate(zip(a["samples"], b["samples"])):
        keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        if keys:
            diffs.append(f"sample {i} differs in {', '.join(keys)}")
    for k in sorted(set(a["batches"]) & set(b["batches"]), key=int):
        if a["batches"][k] != b["batches"][k]:
            diffs.append(f"batch {k} is the first checked batch that differs")
            break
    return diffs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--card", default=str(SHIPPED_CARD), help="segmenter card whose recipe to follow (default: shipped)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="JSON file for the fingerprint (not replaced if it exists)")
    ap.add_argument("--compare", help="an earlier fingerprint (JSON) to compare with")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"--out: {out} exists; pick a new name")
    if not Path(a.card).is_file():
        raise SystemExit(f"--card: no card at {a.card}")
    if a.compare and not Path(a.compare).is_file():
        raise SystemExit(f"--compare: no fingerprint file at {a.compare}")
    import torch

    torch.set_num_threads(a.threads)
    res = fingerprint(recipe(json.loads(Path(a.card).read_text())), a.batches)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=0)))
    print(f"saved {out}")
    if a.compare:
        diffs = compare(json.loads(Path(a.compare).read_text()), res)
        print("same stream" if not diffs else "\n".join(diffs[:20]))
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
