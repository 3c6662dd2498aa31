"""Typing on a lab no classifier was trained on: the SigTuple smears, read by eye.

No shipped classifier has seen a SigTuple cell (SigTuple has masks, no types: the classifiers learn
from Tecom, BCCD and wbc_crops). ``sigtuple_types.csv`` beside this script holds one developer's
reading of the 90 WBCs that segmenter 0.5.0 finds in the 61 ``sigtuple/unlabeled`` smears: image,
the cell's centre (y, x) and a type, or ``unsure`` for 11 cells the reader could not type (smudged,
large mononuclear cells between lymphocyte and monocyte, faint granules). The reader is not a
haematologist and read the cells from contact sheets that showed no prediction (``--sheets``
makes them again); treat the reading as noisy, and its rare classes (6 lymphocytes, 7 eosinophils,
1 monocyte among 79 typed cells) as a handful. WBCs the segmenter missed are not in it.

For each classifier: every listed smear is segmented (``--model``) and classified; each read cell
is matched to the label under its centre (or the nearest within 20 px); the table gives the
accuracy and per-type recalls on the typed cells, and the differential count over every segmented
cell against the reading's.

    python benchmarks/sigtuple_types.py --threads 1 [--model PATH] [--classifier NAME_OR_PATH ...]
        [--sheets DIR] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402

READING = Path(__file__).resolve().parent / "sigtuple_types.csv"
TYPES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
ALL_TYPES = (*TYPES, "basophil")


def read_reading(path=READING) -> dict[str, list[tuple[int, int, str]]]:
    by_image: dict[str, list] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            by_image.setdefault(row["image"], []).append((int(row["y"]), int(row["x"]), row["type"]))
    return by_image


def label_at(labels: np.ndarray, y: int, x: int, radius: int = 20) -> int:
    """The label under (y, x), else the nearest label within ``radius`` px, else 0."""
    if labels[y, x]:
        return int(labels[y, x])
    y0, x0 = max(y - radius, 0), max(x - radius, 0)
    win = labels[y0 : y + radius + 1, x0 : x + radius + 1]
    yy, xx = np.nonzero(win)
    if not len(yy):
        return 0
    d = (yy + y0 - y) ** 2 + (xx + x0 - x) ** 2
    k = int(np.argmin(d))
    return int(win[yy[k], xx[k]]) if d[k] <= radius**2 else 0


def contact_sheets(cells, folder: Path, per: int = 30) -> None:
    """Sheets of 160 px crops (0.8 x the cell's size each side of its centre), numbered, no prediction."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(cells), per):
        sheet = Image.new("RGB", (6 * 164, 5 * 184), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (name, crop) in enumerate(cells[k : k + per]):
            x, y = (i % 6) * 164, (i // 6) * 184
            sheet.paste(Image.fromarray(crop).resize((160, 160), Image.LANCZOS), (x, y))
            draw.text((x + 2, y + 162), f"#{k + i} {name}", fill="black")
        sheet.save(folder / f"sheet_{k // per}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="segmenter file (default: the shipped one)")
    ap.add_argument("--classifier", nargs="+", default=["wbc_classifier", "wbc_classifier_stain_robust"],
                    help="classifiers to compare: shipped names or files")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--adapt", action="store_true",
                    help="also each classifier adapted to these smears' stain (napari_wbc.adapt_classifier on all "
                         "the segmented cells), as '<name> adapted'")
    ap.add_argument("--sheets", default=None, help="folder for the contact sheets the reading was made from")
    ap.add_argument("--out", default=None, help="markdown table to write")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from skimage.measure import regionprops

    from napari_wbc import classify, segment
    from napari_wbc.core.io import read_image, to_rgb

    reading = read_reading()
    folder = wbc_data.DATA / "sigtuple/unlabeled"
    # per classifier: (true, predicted) for read cells; predicted type of every segmented cell
    fields = []  # (rgb, labels, {label: read type}) of each smear
    missed, crops = 0, []
    for name in sorted(reading):
        rgb = to_rgb(read_image(folder / name))
        labels = segment(rgb, model=a.model, device="cpu")
        if a.sheets:
            regions = regionprops(labels)
            m = max((int(max(r.bbox[2] - r.bbox[0], r.bbox[3] - r.bbox[1]) * 0.8) for r in regions), default=0)
            pad = np.pad(rgb, ((m, m), (m, m), (0, 0)), constant_values=255)  # once per image
            for r in regions:
                cy, cx = (int(v) for v in r.centroid)
                s = int(max(r.bbox[2] - r.bbox[0], r.bbox[3] - r.bbox[1]) * 0.8)
                crops.append((f"{name[:10]} y{cy} x{cx}", pad[m + cy - s : m + cy + s, m + cx - s : m + cx + s]))
        found = {}
        for y, x, t in reading[name]:
            lab = label_at(labels, y, x)
            missed += lab == 0
            if lab:
                found[lab] = t
        if labels.max():
            fields.append((rgb, labels, found))
    models = {c: c for c in a.classifier}
    if a.adapt:
        import tempfile

        from napari_wbc.core.adapt import adapt_classifier

        tmp = tempfile.mkdtemp(prefix="wbc_adapt_")
        for c in a.classifier:
            models[f"{c} adapted"] = adapt_classifier([f[0] for f in fields], [f[1] for f in fields], model=c,
                                                      output=Path(tmp) / f"{Path(c).stem}_adapted.safetensors")
    # per classifier: (true, predicted) for read cells; predicted type of every segmented cell
    pairs = {c: [] for c in models}
    counts = {c: dict.fromkeys(ALL_TYPES, 0) for c in models}
    for rgb, labels, found in fields:
        for c, m in models.items():
            table = classify(rgb, labels, model=m)
            predicted = dict(zip(table["label"].astype(int), table["cell_type"]))
            for t in predicted.values():
                counts[c][t] = counts[c].get(t, 0) + 1
            pairs[c] += [(t, predicted.get(lab, "none")) for lab, t in found.items() if t in TYPES]
    if a.sheets:
        contact_sheets(crops, Path(a.sheets))

    read_counts = {t: sum(t == r[2] for rows in reading.values() for r in rows) for t in (*TYPES, "unsure")}
    lines = ["### A third lab: SigTuple smears typed by eye", "",
             f"Command: `{wbc_data.command_line('sigtuple_types.py', argv)}`  ",
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; the reading: "
             + ", ".join(f"{read_counts[t]} {t}" for t in (*TYPES, "unsure"))
             + f"; read cells not found by the segmenter: {missed}", "",
             "| classifier | typed cells | accuracy | " + " | ".join(f"{t} recall" for t in TYPES)
             + " | mean recall | count over all segmented cells (N / L / M / E / B) |",
             "|---|---|---|" + "---|" * len(TYPES) + "---|---|"]
    for c in models:
        p = pairs[c]
        acc = np.mean([t == q for t, q in p]) if p else float("nan")
        rec = []
        for t in TYPES:
            n = sum(tt == t for tt, _ in p)
            k = sum(tt == t and q == t for tt, q in p)
            rec.append((k, n))
        mean = np.mean([k / n for k, n in rec if n])
        cnt = " / ".join(str(counts[c][t]) for t in ALL_TYPES)
        lines.append(f"| {c} | {len(p)} | {acc:.3f} | " + " | ".join(f"{k}/{n}" for k, n in rec)
                     + f" | {mean:.3f} | {cnt} |")
    lines += ["", "Confusion (rows: the reading; columns: predicted):", ""]
    for c in models:
        lines += [f"{c}:", "", "| read \\ predicted | " + " | ".join(ALL_TYPES) + " |", "|---|" + "---|" * len(ALL_TYPES)]
        for t in TYPES:
            lines.append(f"| {t} | " + " | ".join(str(sum(tt == t and q == u for tt, q in pairs[c])) for u in ALL_TYPES) + " |")
        lines.append("")
    wbc_data.finish_table(lines, a.out)


if __name__ == "__main__":
    main()
