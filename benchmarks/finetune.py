"""Human-in-the-loop benchmark: fine-tuning on a few corrected images of an unseen domain.

    python benchmarks/train_segmenter.py --exclude tecom --steps 1500 --threads 1 --out runs/no_tecom.safetensors
    python benchmarks/finetune.py --base runs/no_tecom.safetensors --sizes 5 10 20

The base model never saw Tecom (yellowish background, rapid stain). We fine-tune it
with ``napari_wbc.finetune`` on the first 5, 10 and 20 Tecom *train* crops (one
WBC each, so N images = N corrected cells) and report matched-cell Dice on all
Tecom *validation* crops (never trained on) before and after, with wall time.
Evaluation uses ``segment(..., diameter=None)`` (what a user gets) and the known
diameter. Writes docs/benchmarks_finetune.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tecom(split):
    return [(p.name, *wbc_data.load_image_mask(p, m)) for p, m, sp in wbc_data.tecom() if sp == split]


def score(model, items, known):
    from napari_wbc import segment
    from napari_wbc.core.metrics import match_instances, summarise
    from napari_wbc.core.train import cell_diameter

    res = []
    for _, rgb, lab in items:
        pred = segment(rgb, model=model, device="cpu", diameter=cell_diameter(lab) if known else None)
        res.append(match_instances(lab, pred))
    return summarise(res)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_finetune.md"))
    a = ap.parse_args(argv)
    import torch

    from napari_wbc import finetune

    train, val = tecom("train"), tecom("val")
    rows = []
    b_auto, b_known = score(a.base, val, False), score(a.base, val, True)
    print("base", b_auto, b_known, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="wbc_ft_"))
    for n in a.sizes:
        imgs = [rgb for _, rgb, _ in train[:n]]
        labs = [lab for _, _, lab in train[:n]]
        t0 = time.perf_counter()
        out = finetune(imgs, labs, base=a.base, device=a.device, output=tmp / f"ft_{n}.safetensors")
        wall = time.perf_counter() - t0
        improved = Path(out) != Path(a.base)
        f_auto, f_known = score(out, val, False), score(out, val, True)
        rows.append((n, wall, improved, f_auto, f_known))
        print(n, wall, improved, f_auto, f_known, flush=True)
    lines = [
        f"Command: `{wbc_data.command_line(__file__, argv)}`  ",
        f"Base: {a.base} (trained without Tecom). Fine-tuning data: the first N Tecom train crops "
        f"(1 WBC each). Evaluation: all {len(val)} Tecom validation crops. CPU: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}.",
        "",
        "| corrected cells | fine-tune wall time (s) | new model kept | matched Dice (auto diameter) | F1 (auto) | matched Dice (known diameter) | F1 (known) |",
        "|---|---|---|---|---|---|---|",
        f"| 0 (base) | - | - | {b_auto['matched_dice']:.3f} | {b_auto['f1']:.3f} | {b_known['matched_dice']:.3f} | {b_known['f1']:.3f} |",
    ]
    for n, wall, improved, fa, fk in rows:
        lines.append(f"| {n} | {wall:.0f} | {'yes' if improved else 'no (base kept)'} | {fa['matched_dice']:.3f} | {fa['f1']:.3f} | {fk['matched_dice']:.3f} | {fk['f1']:.3f} |")
    wbc_data.finish_table(lines, a.out)


if __name__ == "__main__":
    main()
