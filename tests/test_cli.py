"""The command-line tool and the batch engine behind it (tiny random networks, CPU)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from napari_wbc import __version__
from napari_wbc.cli import main, pair_images_masks
from napari_wbc.core import batch

# the smallest SigTuple smears (about 340 px square): quick even with random networks
REAL_IMAGES = ["029E137BB177.jpg", "D91DD06F9B3E.jpg"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from napari_wbc.core.testing import make_tiny_classifier, make_tiny_segmenter

    d = tmp_path_factory.mktemp("models")
    return make_tiny_segmenter(d / "seg.safetensors"), make_tiny_classifier(d / "cls.safetensors")


def smear(h=64, w=80, seed=0) -> np.ndarray:
    """A small synthetic smear: pale background, pink red cells, one purple WBC."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (235, 225, 230), np.float32)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(8):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (220, 150, 160)
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < 120] = (120, 60, 160)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_inputs(folder: Path) -> dict:
    """Two RGB smears, a greyscale one, a corrupt and an empty file, a mask and a masks/ folder."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smear(seed=1)).save(folder / "a.png")
    Image.fromarray(smear(seed=2)).save(folder / "b.jpg", quality=95)
    Image.fromarray(smear(seed=3).mean(-1).astype(np.uint8)).save(folder / "grey.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(folder / "a-mask.png")
    (folder / "masks").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(folder / "masks" / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return {"ok": ["a", "b", "grey"], "failed": ["corrupt", "empty"]}


def seg_args(inputs, out, models, *extra):
    seg, cls = models
    return ["segment", *map(str, inputs), "--out", str(out), "--model", str(seg), "--classifier", str(cls),
            "--device", "cpu", "--quiet", *extra]


class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.h3, self.imgs, self._in_h3 = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "h3":
            self._in_h3 = True
            self.h3.append("")
        elif tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag == "h3":
            self._in_h3 = False

    def handle_data(self, data):
        if self._in_h3:
            self.h3[-1] += data


def parse_report(path: Path) -> _ReportParser:
    p = _ReportParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def mtimes(out: Path) -> dict:
    return {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.name.endswith((".tif", ".csv", ".done"))
            and f.name != "summary.csv"}


# ------------------------------------------------------------------ help and version
def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
    for cmd in ([], ["segment"], ["train"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: napari-wbc" in out
    assert main([]) == 2  # no command: help on stderr, usage error
    with pytest.raises(SystemExit) as e:
        main(["segment", "x.jpg"])  # --out is required
    assert e.value.code == 2


# ------------------------------------------------------------------ segment
def test_segment_outputs_failures_report(tmp_path, tiny_models, capsys):
    inp = tmp_path / "in"
    expect = write_inputs(inp)
    out = tmp_path / "out"
    rc = main(seg_args([inp], out, tiny_models))
    err = capsys.readouterr().err
    assert rc == 1  # corrupt.jpg and empty.png failed
    assert "corrupt.jpg" in err and "empty.png" in err and "mask file" in err

    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["image"]) == sorted(expect["ok"] + expect["failed"])  # no mask, no notes.txt
    st = dict(zip(summary["image"], summary["status"]))
    assert all(st[n] == "ok" for n in expect["ok"]) and all(st[n] == "failed" for n in expect["failed"])
    failed = summary[summary["status"] == "failed"]
    assert failed["error"].str.contains("corrupt.jpg|empty.png").all()
    assert {"n_wbc", "n_neutrophil", "pct_basophil", "error", "path"} <= set(summary.columns)

    for name in expect["ok"]:
        labels = tifffile.imread(out / f"{name}_labels.tif")
        assert labels.dtype == np.uint16 and labels.shape == (64, 80)
        cells = pd.read_csv(out / f"{name}_cells.csv")
        assert list(cells.columns) == batch.CELL_COLUMNS
        assert sorted(cells["label"]) == sorted(set(np.unique(labels)) - {0})
        row = summary[summary["image"] == name].iloc[0]
        assert row["n_wbc"] == len(cells)
        if len(cells):
            assert cells["cell_type"].isin(batch.CLASSES).all()
            assert np.allclose(cells[batch.PROB_COLUMNS].sum(1), 1, atol=1e-4)
            assert sum(row[f"n_{c}"] for c in batch.CLASSES) == len(cells)
        assert (out / f"{name}.done").is_file()
    for name in expect["failed"]:
        assert not (out / f"{name}_labels.tif").exists()
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temp files left

    report = parse_report(out / "report.html")
    assert sorted(report.h3) == sorted(expect["ok"] + expect["failed"])
    assert len(report.imgs) == len(expect["ok"])
    assert all(i["src"].startswith("data:image/png;base64,") for i in report.imgs)
    text = (out / "report.html").read_text()
    assert __version__ in text and str(tiny_models[0]) in text and "cpu" in text


def test_resume_overwrite_and_interrupted_run(tmp_path, tiny_models, capsys, monkeypatch):
    inp = tmp_path / "in"
    for i in range(2):
        inp.mkdir(exist_ok=True)
        Image.fromarray(smear(seed=i)).save(inp / f"s{i}.png")
    out = tmp_path / "out"
    assert main(seg_args([inp], out, tiny_models)) == 0
    first = mtimes(out)
    assert len(first) == 6

    # a second run keeps every output (resumable)
    assert main(seg_args([inp], out, tiny_models)) == 0
    assert mtimes(out) == first
    assert set(pd.read_csv(out / "summary.csv")["status"]) == {"skipped"}
    assert len(parse_report(out / "report.html").imgs) == 2  # previews rebuilt from the stored outputs

    # --overwrite rewrites them
    assert main(seg_args([inp], out, tiny_models, "--overwrite")) == 0
    again = mtimes(out)
    assert all(again[k] != first[k] for k in first)
    assert set(pd.read_csv(out / "summary.csv")["status"]) == {"ok"}

    # an image whose source changed is redone
    Image.fromarray(smear(seed=7)).save(inp / "s0.png")
    assert main(seg_args([inp], out, tiny_models)) == 0
    st = dict(pd.read_csv(out / "summary.csv")[["image", "status"]].values)
    assert st == {"s0": "ok", "s1": "skipped"}

    # a run killed while writing s1's table leaves no marker: the next run redoes s1 only
    capsys.readouterr()
    real = batch.atomic_write

    def dying(path, fn, **kw):
        if str(path).endswith("s1_cells.csv"):
            raise KeyboardInterrupt
        return real(path, fn, **kw)

    monkeypatch.setattr(batch, "atomic_write", dying)
    assert main(seg_args([inp / "s1.png"], out, tiny_models, "--overwrite")) == 130
    monkeypatch.setattr(batch, "atomic_write", real)
    assert json.loads((out / "s1.done").read_text()).get("pending")  # vouches for nothing
    assert not [f for f in out.iterdir() if f.name.startswith(".")]
    assert main(seg_args([inp], out, tiny_models)) == 0
    st = dict(pd.read_csv(out / "summary.csv")[["image", "status"]].values)
    assert st == {"s0": "skipped", "s1": "ok"}


def test_outputs_of_another_image_or_corrected_by_hand_are_kept(tmp_path, tiny_models, capsys):
    """Without --overwrite a run never replaces another image's outputs of the same name, nor a labels
    file corrected after it was written; a run that types cells redoes images counted untyped."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    Image.fromarray(smear(seed=1)).save(a / "x.png")
    Image.fromarray(smear(seed=2)).save(b / "x.png")
    out = tmp_path / "out"
    assert main(seg_args([a], out, tiny_models, "--no-classify")) == 0
    assert pd.read_csv(out / "x_cells.csv")["cell_type"].isna().all()
    # typing asked for now: the untyped image is done again (same source, outputs untouched)
    assert main(seg_args([a], out, tiny_models)) == 0
    assert dict(pd.read_csv(out / "summary.csv")[["image", "status"]].values) == {"x": "ok"}
    assert main(seg_args([a], out, tiny_models)) == 0  # and then skipped
    assert dict(pd.read_csv(out / "summary.csv")[["image", "status"]].values) == {"x": "skipped"}
    kept = {f: (out / f).read_bytes() for f in ("x_labels.tif", "x_cells.csv", "x.done")}
    capsys.readouterr()
    # another image with the same name: failed, the first image's outputs stay, and so does the summary
    # that lists the first image (moved aside, this run's summary written)
    first_summary = (out / "summary.csv").read_bytes()
    assert main(seg_args([b], out, tiny_models)) == 1
    err = capsys.readouterr().err
    assert "another image" in err and "kept as" in err
    assert {f: (out / f).read_bytes() for f in kept} == kept
    aside = sorted(out.glob("summary_*.csv"))
    assert len(aside) == 1 and aside[0].read_bytes() == first_summary and len(list(out.glob("report_*.html"))) == 1
    assert dict(pd.read_csv(out / "summary.csv")[["image", "status"]].values) == {"x": "failed"}
    # a labels file corrected by hand is not replaced when its source changes
    lab = tifffile.imread(out / "x_labels.tif")
    lab[:5, :5] = lab.max() + 1
    tifffile.imwrite(out / "x_labels.tif", lab)
    edited = (out / "x_labels.tif").read_bytes()
    Image.fromarray(smear(seed=3)).save(a / "x.png")
    assert main(seg_args([a], out, tiny_models)) == 1
    assert "changed after napari-wbc wrote it" in capsys.readouterr().err
    assert (out / "x_labels.tif").read_bytes() == edited
    # --overwrite is the user's explicit say
    assert main(seg_args([b], out, tiny_models, "--overwrite")) == 0
    assert json.loads((out / "x.done").read_text())["stamp"]["source"] == str((b / "x.png").resolve())


def test_skipped_image_is_counted_from_outputs_corrected_by_hand(tmp_path, tiny_models, capsys):
    """Outputs corrected by hand are kept on a re-run, and the summary and report count what they say
    now (not the earlier run's counts); an unreadable corrected table fails the image, files kept."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    assert main(seg_args([inp], out, tiny_models)) == 0
    lab = np.zeros((64, 80), np.uint16)
    lab[2:12, 2:12], lab[20:30, 20:30], lab[40:50, 40:50] = 1, 2, 3
    tifffile.imwrite(out / "x_labels.tif", lab)
    table = pd.DataFrame({"label": [1, 2, 3], "cell_type": ["neutrophil", "neutrophil", "lymphocyte"]})
    table.to_csv(out / "x_cells.csv", index=False)
    capsys.readouterr()
    assert main(seg_args([inp], out, tiny_models)) == 0
    assert "1 already done (1 counted from outputs corrected by hand)" in capsys.readouterr().err
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert row["status"] == "skipped" and row["n_wbc"] == 3
    assert (row["n_neutrophil"], row["n_lymphocyte"], row["n_monocyte"]) == (2, 1, 0)
    assert row["pct_neutrophil"] == pytest.approx(66.7)
    assert row["note"] == "counted from x_labels.tif and x_cells.csv as corrected by hand"
    assert "counted from x_labels.tif and x_cells.csv as corrected by hand" in (out / "report.html").read_text()
    lab[lab == 2] = 0  # a cell erased in the labels only: it no longer counts
    tifffile.imwrite(out / "x_labels.tif", lab)
    assert main(seg_args([inp], out, tiny_models)) == 0
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert (row["n_wbc"], row["n_neutrophil"], row["n_lymphocyte"]) == (2, 1, 1)
    (out / "x_cells.csv").write_text("cell,kind\n1,neutrophil\n")  # no label column
    kept = {f: (out / f).read_bytes() for f in ("x_labels.tif", "x_cells.csv", "x.done")}
    capsys.readouterr()
    assert main(seg_args([inp], out, tiny_models)) == 1
    err = capsys.readouterr().err
    assert "x_cells.csv" in err and "cannot be read" in err
    assert {f: (out / f).read_bytes() for f in kept} == kept


def test_types_corrected_in_napari_and_saved_over_the_batch_labels_are_counted_by_the_next_run(tmp_path, tiny_models):
    """The reader opens the batch's x_labels.tif with x_cells.csv; napari-wbc's writer, saving the
    corrected layer under the same name, writes that same table (it wrote x_labels_cells.csv, which the
    batch never read: a re-run counted the old types, and after --overwrite napari showed stale ones)."""
    from napari_wbc._reader import read_smear
    from napari_wbc._writer import write_labels

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    assert main(seg_args([inp], out, tiny_models)) == 0
    data, meta, kind = read_smear(str(out / "x_labels.tif"))[0]
    assert kind == "labels" and len(meta["features"]) >= 1
    features = meta["features"].copy()
    first = int(features["label"].iloc[0])
    new = "basophil" if features["cell_type"].iloc[0] != "basophil" else "monocyte"
    features.loc[features.index[0], "cell_type"] = new  # the Classify widget's "Set type"
    written = write_labels(str(out / "x_labels.tif"), data, {**meta, "features": features})
    assert written == [str(out / "x_labels.tif"), str(out / "x_cells.csv")]
    assert not (out / "x_labels_cells.csv").exists()
    assert main(seg_args([inp], out, tiny_models)) == 0
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert row["status"] == "skipped" and row[f"n_{new}"] >= 1
    assert "corrected by hand" in row["note"]
    again = read_smear(str(out / "x_labels.tif"))[0][1]["features"].set_index("label")
    assert again.loc[first, "cell_type"] == new


def test_a_fine_tuned_segmenter_types_with_its_own_classifier_as_in_the_widget(tmp_path, tiny_models, capsys,
                                                                            monkeypatch):
    """Without --classifier, a segmenter whose card names the classifier fine-tuned with it types with
    that one (the Segment widget did; the CLI and run_batch used the shipped one): same types everywhere."""
    from napari_wbc.core import models
    from napari_wbc.core.finetune import classifier_for
    from napari_wbc.core.testing import make_tiny_classifier, make_tiny_segmenter

    monkeypatch.setitem(models.SHIPPED, "classifier", tiny_models[1])  # "shipped": seed 0
    seg = make_tiny_segmenter(tmp_path / "m" / "my_unet.safetensors")
    paired = make_tiny_classifier(tmp_path / "m" / "my_unet_classifier.safetensors", seed=5)
    card = json.loads(models.card_path(seg).read_text())
    card["classifier"] = paired.name  # as finetune(cell_types=...) writes it
    models.card_path(seg).write_text(json.dumps(card))
    assert classifier_for(seg) == paired and classifier_for(None) is None and classifier_for(tiny_models[0]) is None
    from napari_wbc.core import classify as C

    calls = []
    real = C.classify
    monkeypatch.setattr(C, "classify", lambda *a, **k: calls.append(str(k["model"])) or real(*a, **k))
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    assert main(["segment", str(inp), "--out", str(tmp_path / "o1"), "--model", str(seg), "--device", "cpu",
                 "--quiet"]) == 0
    assert calls == [str(paired)]
    assert "typing cells with my_unet_classifier.safetensors" in capsys.readouterr().err
    assert main(["segment", str(inp), "--out", str(tmp_path / "o2"), "--model", str(seg), "--classifier",
                 str(tiny_models[1]), "--device", "cpu", "--quiet"]) == 0  # chosen: that one
    assert calls[-1] == str(tiny_models[1])
    batch.run_batch([inp / "x.png"], tmp_path / "o3", batch.Settings(model=str(seg), device="cpu"))  # the API
    assert calls[-1] == str(paired)
    batch.process_one(inp / "x.png", tmp_path / "o4", batch.Settings(model=str(seg), device="cpu"))
    assert calls[-1] == str(paired)


def test_real_images_with_corrupt_and_greyscale(tmp_path, tiny_models, data_dir, capsys):
    src = data_dir / "sigtuple" / "unlabeled"
    if not all((src / n).is_file() for n in REAL_IMAGES):
        pytest.skip(f"SigTuple unlabeled images absent from {src}")
    inp = tmp_path / "in"
    inp.mkdir()
    for n in REAL_IMAGES:
        shutil.copy(src / n, inp / n)
    Image.open(src / REAL_IMAGES[0]).convert("L").save(inp / "grey.tif")
    (inp / "broken.png").write_bytes(Image.open(src / REAL_IMAGES[1]).tobytes()[:500])
    out = tmp_path / "out"
    assert main(seg_args([inp], out, tiny_models)) == 1
    assert "broken.png" in capsys.readouterr().err
    summary = pd.read_csv(out / "summary.csv").set_index("image")
    assert summary.loc["broken", "status"] == "failed"
    for n in [Path(n).stem for n in REAL_IMAGES] + ["grey"]:
        assert summary.loc[n, "status"] == "ok"
        labels = tifffile.imread(out / f"{n}_labels.tif")
        assert labels.shape == Image.open(inp / (n + (".tif" if n == "grey" else ".jpg"))).size[::-1]
    assert sorted(parse_report(out / "report.html").h3) == sorted(summary.index)


def test_stem_collisions_and_collection(tmp_path, tiny_models):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        Image.fromarray(smear(seed=len(d))).save(tmp_path / d / "same.png")
    Image.fromarray(smear()).save(tmp_path / "x" / "same.jpg")
    files = [tmp_path / "x" / "same.png", tmp_path / "y" / "same.png", tmp_path / "x" / "same.jpg"]
    assert batch.output_names(files) == ["x_same", "y_same", "x_same-2"]
    out = tmp_path / "out"
    assert main(seg_args([tmp_path / "x", tmp_path / "y"], out, tiny_models)) == 0
    assert sorted(pd.read_csv(out / "summary.csv")["image"]) == ["x_same", "x_same-2", "y_same"]
    for n in ("x_same", "x_same-2", "y_same"):
        assert (out / f"{n}_labels.tif").is_file() and (out / f"{n}_cells.csv").is_file()

    # recursion, masks/ folders, mask names and the output folder are handled
    root = tmp_path / "tree"
    write_inputs(root / "sub")
    Image.fromarray(smear()).save(root / "top.png")
    files, notes = batch.collect_images([root])
    assert [f.name for f in files] == ["top.png"]
    files, notes = batch.collect_images([root], recursive=True, exclude=[root / "sub"])
    assert [f.name for f in files] == ["top.png"]
    files, notes = batch.collect_images([root], recursive=True)
    assert sorted(f.name for f in files) == ["a.png", "b.jpg", "corrupt.jpg", "empty.png", "grey.png", "top.png"]
    assert any("mask" in n for n in notes)
    # linked sub-folders are followed (Path.rglob skipped them), each real folder once (no loop)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(smear()).save(elsewhere / "linked.png")
    os.symlink(elsewhere, root / "link")
    os.symlink(root, elsewhere / "back_to_root")  # a loop
    files, _ = batch.collect_images([root], recursive=True)
    assert sorted(f.name for f in files) == ["a.png", "b.jpg", "corrupt.jpg", "empty.png", "grey.png", "linked.png",
                                             "top.png"]
    (root / "link").unlink()
    # an output folder inside the input folder: our label images are not inputs
    (root / "sub" / "a_labels.tif").write_bytes(b"")
    files, _ = batch.collect_images([root / "sub"], exclude=[root / "sub"])
    assert "a_labels.tif" not in [f.name for f in files]
    # nor those an earlier run wrote there with another --out (its marker says so); a user's own stays
    (root / "sub" / "own_labels.tif").write_bytes(b"")
    files, _ = batch.collect_images([root / "sub"])
    assert "a_labels.tif" in [f.name for f in files] and "own_labels.tif" in [f.name for f in files]
    (root / "sub" / "a.done").write_text("{}")
    files, _ = batch.collect_images([root / "sub"])
    assert "a_labels.tif" not in [f.name for f in files] and "own_labels.tif" in [f.name for f in files]


def test_untyped_when_no_classifier(tmp_path, tiny_models, capsys, monkeypatch):
    from napari_wbc.core import models

    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smear()).save(inp / "s.png")
    seg, _ = tiny_models
    args = ["segment", str(inp), "--out", str(tmp_path / "o1"), "--model", str(seg), "--device", "cpu", "-q"]
    assert main([*args, "--no-classify"]) == 0
    cells = pd.read_csv(tmp_path / "o1" / "s_cells.csv")
    assert list(cells.columns) == batch.CELL_COLUMNS and cells["cell_type"].isna().all()
    summary = pd.read_csv(tmp_path / "o1" / "summary.csv")
    assert summary["n_neutrophil"].isna().all() and summary["n_wbc"].notna().all()

    monkeypatch.setitem(models.SHIPPED, "classifier", tmp_path / "absent.safetensors")
    args[3] = str(tmp_path / "o2")
    assert main(args) == 0
    assert "classifier" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "o2" / "s_cells.csv")["cell_type"].isna().all()


def test_usage_errors(tmp_path, tiny_models, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    assert main(seg_args([inp], tmp_path / "out", tiny_models)) == 2  # no images
    assert "no image files" in capsys.readouterr().err
    Image.fromarray(smear()).save(inp / "s.png")
    bad = tmp_path / "bad.safetensors"
    assert main(["segment", str(inp), "--out", str(tmp_path / "o"), "--model", str(bad), "--no-classify"]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert main(seg_args([inp], tmp_path / "o", tiny_models, "--device", "nope")) == 2
    assert "--device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a diameter that would enlarge the image past any use
        main(seg_args([inp], tmp_path / "o", tiny_models, "--diameter", "1"))
    assert e.value.code == 2 and "--diameter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # a model whose weights cannot be loaded stops the run before any image
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    shutil.copy(tiny_models[0].with_suffix(".json"), broken.with_suffix(".json"))
    assert main(["segment", str(inp), "--out", str(tmp_path / "o"), "--model", str(broken), "--no-classify",
                 "--device", "cpu"]) == 2
    assert "broken.safetensors" in capsys.readouterr().err and not (tmp_path / "o" / "summary.csv").exists()
    # a classifier passed as the segmenter
    assert main(["segment", str(inp), "--out", str(tmp_path / "o"), "--model", str(tiny_models[1])]) == 2
    assert "expected a segmenter" in capsys.readouterr().err


def test_workers_processes(tmp_path, tiny_models):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        Image.fromarray(smear(seed=i)).save(inp / f"s{i}.png")
    (inp / "bad.png").write_bytes(b"junk")
    out = tmp_path / "out"
    assert main(seg_args([inp], out, tiny_models, "--workers", "2")) == 1
    st = dict(pd.read_csv(out / "summary.csv")[["image", "status"]].values)
    assert st == {"bad": "failed", "s0": "ok", "s1": "ok"}


def test_workers_are_fewer_when_they_would_not_fit_in_memory(tmp_path, tiny_models, monkeypatch, capsys):
    """--workers N ran N processes whatever the images' size: out of memory, the system kills a
    process, maybe the user's napari. Now as many as fit with the largest image, said on stderr."""
    import tifffile

    from napari_wbc.core.io import image_size

    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smear(seed=0)).save(inp / "s0.png")
    tifffile.imwrite(inp / "s1.tif", np.zeros((300, 500, 3), np.uint8))
    h, w = smear(seed=0).shape[:2]
    assert image_size(inp / "s0.png") == (h, w) and image_size(inp / "s1.tif") == (300, 500)
    assert image_size(inp / "missing.png") is None
    files = sorted(inp.iterdir())
    need = batch.WORKER_BASE_BYTES + batch.WORKER_BYTES_PER_PIXEL * max(h * w, 300 * 500)
    assert batch.workers_for_memory(files, 4, available=int(4.5 * need)) == (4, None)
    n, note = batch.workers_for_memory(files, 4, available=int(2.5 * need))
    assert n == 2 and "2 worker processes instead of 4" in note
    assert batch.workers_for_memory(files, 4, available=need // 2)[0] == 1  # never none
    monkeypatch.setattr(batch, "available_memory", lambda: int(1.5 * need))
    assert main(seg_args([inp], tmp_path / "out", tiny_models, "--workers", "2")) == 0
    assert "1 worker process instead of 2" in capsys.readouterr().err
    assert set(pd.read_csv(tmp_path / "out" / "summary.csv")["status"]) == {"ok"}
    assert "1 worker process instead of 2" in (tmp_path / "out" / "report.html").read_text()


def test_a_killed_worker_process_fails_no_other_image(tmp_path, tiny_models):
    """A worker process killed (by the kernel, for memory) broke the pool, and every image of the batch
    failed with BrokenProcessPool, the other worker's too: they are done again, each alone."""
    import multiprocessing as mp
    import signal
    import threading

    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        Image.fromarray(smear(seed=i)).save(inp / f"s{i}.png")
    killed = []

    def kill_a_worker():
        for _ in range(600):
            children = mp.active_children()
            if children:
                os.kill(children[0].pid, signal.SIGKILL)
                killed.append(children[0].pid)
                return
            threading.Event().wait(0.05)

    threading.Thread(target=kill_a_worker, daemon=True).start()
    settings = batch.Settings(model=str(tiny_models[0]), classifier=str(tiny_models[1]), device="cpu")
    rows = batch.run_batch(sorted(inp.glob("*.png")), tmp_path / "out", settings, workers=2)
    assert killed
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"], [r.get("error") for r in rows]


def test_scheduler_without_dask_is_a_usage_error_before_anything_is_made(tmp_path, tiny_models, capsys,
                                                                         monkeypatch):
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    monkeypatch.setitem(sys.modules, "distributed", None)  # not installed
    assert main(seg_args([inp], tmp_path / "out", tiny_models, "--scheduler", "tcp://127.0.0.1:1")) == 2
    assert "--scheduler needs dask.distributed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # was made (empty) before the error


def test_dask_scheduler(tmp_path, tiny_models):
    distributed = pytest.importorskip("distributed")
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        Image.fromarray(smear(seed=i)).save(inp / f"s{i}.png")
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        assert main(seg_args([inp], out, tiny_models, "--scheduler", cluster.scheduler_address)) == 0
        # the same unit of work from Python
        with distributed.Client(cluster) as client:
            settings = batch.Settings(model=str(tiny_models[0]), classify=False, device="cpu", thumbnail=False)
            futs = client.map(batch.process_one, [str(inp / "s0.png")], [str(tmp_path / "py")], [settings])
            (row,) = client.gather(futs)
    assert set(pd.read_csv(out / "summary.csv")["status"]) == {"ok"}
    assert row["status"] == "ok" and (tmp_path / "py" / "s0_labels.tif").is_file()


def test_process_one_reports_bad_files(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    row = batch.process_one(tmp_path / "x.txt", tmp_path / "o", batch.Settings(device="cpu"))
    assert row["status"] == "failed" and "x.txt" in row["error"] and "unsupported" in row["error"]
    row = batch.process_one(tmp_path / "nope.jpg", tmp_path / "o", batch.Settings(device="cpu"))
    assert row["status"] == "failed" and "no such file" in row["error"]


# ------------------------------------------------------------------ train
def _training_pairs(folder: Path, n=2, mask_style="-mask"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = smear(96, 96, seed=i)
        yy, xx = np.mgrid[:96, :96]
        mask = (((yy - 48) ** 2 + (xx - 48) ** 2) < 120).astype(np.uint8) * 255
        Image.fromarray(img).save(folder / f"t{i}.png")
        Image.fromarray(mask).save(folder / f"t{i}{mask_style}.png")


def test_pairing(tmp_path):
    _training_pairs(tmp_path / "sig", mask_style="-mask")
    pairs, lone_i, lone_m = pair_images_masks(tmp_path / "sig", tmp_path / "sig")
    assert [(a.name, b.name) for a, b in pairs] == [("t0.png", "t0-mask.png"), ("t1.png", "t1-mask.png")]
    assert lone_i == [] and lone_m == []
    (tmp_path / "im").mkdir()
    (tmp_path / "ma").mkdir()
    for i in range(2):
        shutil.copy(tmp_path / "sig" / f"t{i}.png", tmp_path / "im" / f"t{i}.png")
    shutil.copy(tmp_path / "sig" / "t0-mask.png", tmp_path / "ma" / "t0.png")
    shutil.copy(tmp_path / "sig" / "t0-mask.png", tmp_path / "ma" / "zz_mask.png")
    pairs, lone_i, lone_m = pair_images_masks(tmp_path / "im", tmp_path / "ma")
    assert [(a.name, b.name) for a, b in pairs] == [("t0.png", "t0.png")]
    assert [p.name for p in lone_i] == ["t1.png"] and [p.name for p in lone_m] == ["zz_mask.png"]
    # x-mask.* beside the images counts too (docs: "in the same folder or in MASKS_DIR"); MASKS_DIR wins
    shutil.copy(tmp_path / "sig" / "t1-mask.png", tmp_path / "im" / "t1-mask.png")
    shutil.copy(tmp_path / "sig" / "t0-mask.png", tmp_path / "im" / "t0-mask.png")
    pairs, lone_i, lone_m = pair_images_masks(tmp_path / "im", tmp_path / "ma")
    assert [(a.name, b.parent.name, b.name) for a, b in pairs] == [("t0.png", "ma", "t0.png"),
                                                                  ("t1.png", "im", "t1-mask.png")]
    assert lone_i == [] and [p.name for p in lone_m] == ["zz_mask.png"]


def test_train_errors(tmp_path, tiny_models, capsys):
    _training_pairs(tmp_path / "d")
    (tmp_path / "d" / "t1-mask.png").unlink()
    base = str(tiny_models[0])
    assert main(["train", str(tmp_path / "d"), str(tmp_path / "d"), "--base", base, "--device", "cpu"]) == 2
    assert "t1.png" in capsys.readouterr().err
    (tmp_path / "e").mkdir()
    assert main(["train", str(tmp_path / "e"), str(tmp_path / "e"), "--base", base]) == 2
    assert "no image/mask pairs" in capsys.readouterr().err


def test_output_folders_that_cannot_be_written_stop_the_run_before_it_starts(tmp_path, tiny_models, capsys):
    """--out under a file, or through a link to nothing: exit 2 at once, nothing processed."""
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    (tmp_path / "afile").write_text("not a folder")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for out in (tmp_path / "afile" / "sub", tmp_path / "dangling" / "sub"):
        assert main(seg_args([inp], out, tiny_models)) == 2
        err = capsys.readouterr().err
        assert "--out" in err and "Traceback" not in err
    assert not (tmp_path / "nowhere").exists()
    _training_pairs(tmp_path / "d")
    assert main(["train", str(tmp_path / "d"), str(tmp_path / "d"), "--base", str(tiny_models[0]),
                 "--out", str(tmp_path / "afile" / "m.safetensors"), "--device", "cpu"]) == 2
    assert "--out" in capsys.readouterr().err


def test_train_on_masks_without_cells_is_a_usage_error(tmp_path, tiny_models, capsys):
    (tmp_path / "d").mkdir()
    Image.fromarray(smear(seed=1)).save(tmp_path / "d" / "x.png")
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(tmp_path / "d" / "x-mask.png")
    assert main(["train", str(tmp_path / "d"), str(tmp_path / "d"), "--base", str(tiny_models[0]),
                 "--device", "cpu"]) == 2
    assert "hold no cell" in capsys.readouterr().err


def test_train_one_epoch(tmp_path, tiny_models, capsys, monkeypatch):
    from napari_wbc.core import finetune

    monkeypatch.setattr(finetune, "STEPS_PER_EPOCH", 2)  # a short epoch: this tests the plumbing
    monkeypatch.setattr(finetune, "BATCH_SIZE", 2)
    _training_pairs(tmp_path / "d", mask_style="_mask")
    field = smear(96, 96, seed=5)
    yy, xx = np.mgrid[:96, :96]
    field[(yy - 48) ** 2 + (xx - 48) ** 2 < 130] = (235, 225, 230)  # red cells only: a field without any WBC
    Image.fromarray(field).save(tmp_path / "d" / "field.png")
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(tmp_path / "d" / "field_mask.png")
    out = tmp_path / "ft" / "mine.safetensors"
    rc = main(["train", str(tmp_path / "d"), str(tmp_path / "d"), "--base", str(tiny_models[0]),
               "--epochs", "1", "--out", str(out), "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "left out, their masks hold no cell: field_mask.png" in cap.err
    assert "training on 2 image(s), 2 cell(s)" in cap.err
    assert "epoch 1/1" in cap.err
    written = Path(cap.out.strip().splitlines()[-1])
    assert written.is_file() and written.suffix == ".safetensors"
    # the new model (or the base when no epoch beat it) is a segmenter the CLI can use
    assert json.loads(written.with_suffix(".json").read_text())["kind"] == "segmenter"
    # never overwritten
    if written == out:
        assert main(["train", str(tmp_path / "d"), str(tmp_path / "d"), "--base", str(tiny_models[0]),
                     "--epochs", "1", "--out", str(out), "--device", "cpu"]) == 2


def _corrected_batch_outputs(tmp_path, classifier=None, n_images=2):
    """Smears in ``smears/`` and, in ``results/``, their x_labels.tif + x_cells.csv as napari-wbc's writer
    saves them after types were corrected by hand (6 cells each, 5 corrected, one of them 'other')."""
    from napari_wbc._writer import write_labels
    from napari_wbc.core.segment import cell_features

    smears, results = tmp_path / "smears", tmp_path / "results"
    smears.mkdir()
    yy, xx = np.mgrid[:96, :120]
    for i in range(n_images):
        Image.fromarray(smear(96, 120, seed=i)).save(smears / f"s{i}.png")
        lab = np.zeros((96, 120), np.int32)
        for k, (cy, cx) in enumerate([(20, 20), (20, 60), (20, 100), (70, 20), (70, 60), (70, 100)]):
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 10 + k  # ids as the labels file has them
        feats = cell_features(lab)
        feats["cell_type"] = ["lymphocyte", "neutrophil", "lymphocyte", "other", "monocyte", "neutrophil"]
        feats["corrected"] = [True, True, True, True, True, False]
        meta = {"napari_wbc": {"image_layer": f"s{i}"} | ({"classifier": str(classifier)} if classifier else {})}
        write_labels(str(results / f"s{i}_labels.tif"), lab, {"features": feats, "metadata": meta})
    return smears, results


@pytest.fixture
def asked_finetune(monkeypatch):
    """finetune as napari-wbc train calls it: its keyword arguments are recorded; the base comes back."""
    import napari_wbc.core.finetune as ft

    calls = []

    def fake(images, labels, base=None, **kw):
        calls.append(dict(kw, images=images, labels=labels, base=base))
        return Path(base)

    monkeypatch.setattr(ft, "finetune", fake)
    return calls


def test_train_on_corrected_batch_outputs_learns_the_corrected_types_too(tmp_path, tiny_models, capsys,
                                                                          asked_finetune):
    """segment --out, correct in napari, save over x_labels.tif, then 'napari-wbc train SMEARS RESULTS':
    the x_labels.tif pair with their smears and the corrected types (not 'other', not uncorrected ones)
    fine-tune the classifier that typed them, as recorded in the labels files."""
    seg, cls = tiny_models
    smears, results = _corrected_batch_outputs(tmp_path, classifier=cls)
    assert main(["train", str(smears), str(results), "--base", str(seg), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    (call,) = asked_finetune
    assert call["cell_types"] == [{10: "lymphocyte", 11: "neutrophil", 12: "lymphocyte", 13: "other",
                                   14: "monocyte"}] * 2
    assert call["classifier"] == str(cls)
    assert sorted(np.unique(call["labels"][0]).tolist()) == [0, 10, 11, 12, 13, 14, 15]  # ids kept
    assert "8 cell types corrected by hand in 2 cells tables fine-tune the classifier cls (it typed them)" in err
    # --classifier wins; --no-types learns the outlines only
    other = tmp_path / "other.safetensors"
    shutil.copy(cls, other)
    shutil.copy(cls.with_suffix(".json"), other.with_suffix(".json"))
    assert main(["train", str(smears), str(results), "--base", str(seg), "--device", "cpu",
                 "--classifier", str(other)]) == 0
    assert asked_finetune[-1]["classifier"] == str(other.resolve())
    assert main(["train", str(smears), str(results), "--base", str(seg), "--device", "cpu", "--no-types"]) == 0
    assert asked_finetune[-1]["cell_types"] is None and asked_finetune[-1]["classifier"] is None


def test_train_with_corrected_types_writes_the_pair(tmp_path, tiny_models, capsys, monkeypatch):
    """The real fine-tune (short): a new segmenter on stdout and, when the types were learned, its
    classifier beside it, which 'segment --model NEW' types with."""
    from napari_wbc.core import finetune
    from napari_wbc.core.models import read_card

    monkeypatch.setattr(finetune, "STEPS_PER_EPOCH", 2)
    monkeypatch.setattr(finetune, "BATCH_SIZE", 2)
    seg, cls = tiny_models
    smears, results = _corrected_batch_outputs(tmp_path, classifier=cls)
    out = tmp_path / "ft" / "mine.safetensors"
    out.parent.mkdir()
    rc = main(["train", str(smears), str(results), "--base", str(seg), "--epochs", "1", "--out", str(out),
               "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "classifier epoch" in cap.err  # its own epochs are reported
    written = Path(cap.out.strip().splitlines()[-1])
    learned = [line for line in cap.err.splitlines() if "the classifier learned the corrected types:" in line]
    if learned:
        new_cls = finetune.classifier_for(written)
        assert new_cls is not None and str(new_cls) in learned[0] and read_card(new_cls)["kind"] == "classifier"
        assert read_card(new_cls)["finetune"]["base"] == str(cls)  # the one that typed them
    else:
        assert "the corrected types were not learned" in cap.err


def test_train_types_not_recorded_or_too_few_or_misspelt(tmp_path, tiny_models, capsys, asked_finetune):
    import pandas as pd

    seg, cls = tiny_models
    smears, results = _corrected_batch_outputs(tmp_path, classifier=None, n_images=1)
    assert main(["train", str(smears), str(results), "--base", str(seg), "--device", "cpu"]) == 0
    assert asked_finetune[-1]["classifier"] is None  # finetune's default: the pair's, else the shipped one
    assert "(not recorded which typed them)" in capsys.readouterr().err
    table = pd.read_csv(results / "s0_cells.csv")
    table["corrected"] = [True, False, False, False, False, False]  # one corrected cell: too few to check
    table.to_csv(results / "s0_cells.csv", index=False)
    assert main(["train", str(smears), str(results), "--base", str(seg), "--device", "cpu"]) == 0
    assert asked_finetune[-1]["cell_types"] is None
    assert "the corrected types are not learned, the outlines are: too few" in capsys.readouterr().err
    table["cell_type"] = ["lymfocyte"] + list(table["cell_type"][1:])
    table.to_csv(results / "s0_cells.csv", index=False)
    n = len(asked_finetune)
    assert main(["train", str(smears), str(results), "--base", str(seg), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "s0_cells.csv" in err and "'lymfocyte'" in err and len(asked_finetune) == n  # nothing trained


def test_batch_labels_record_the_models_that_made_them(tmp_path, tiny_models, monkeypatch):
    """x_labels.tif names the segmenter and the classifier that typed its cells (then opened in napari,
    or trained on with 'napari-wbc train', the corrected types fine-tune that classifier)."""
    import napari_wbc.core.segment as core_segment
    from napari_wbc._reader import read_smear
    from napari_wbc.core.io import saved_source

    seg, cls = tiny_models
    inp = tmp_path / "in"
    inp.mkdir()
    image = smear(seed=1)
    Image.fromarray(image).save(inp / "x.png")
    wbc = (image.mean(-1) < 130).astype(np.int32)  # the purple cell, whatever the random net makes of it
    monkeypatch.setattr(core_segment, "iter_segment", lambda img, **kw: iter([("labels", wbc)]))
    assert main(seg_args([inp], tmp_path / "out", tiny_models)) == 0
    made = {"image_layer": "x", "model": str(seg)}  # (no diameter: the stand-in segmentation gives none)
    assert saved_source(tmp_path / "out" / "x_labels.tif") == {**made, "classifier": str(cls)}
    meta = read_smear(str(tmp_path / "out" / "x_labels.tif"))[0][1]
    assert meta["metadata"]["napari_wbc"]["classifier"] == str(cls)  # what Train's auto reads
    assert meta["metadata"]["napari_wbc"]["image_layer"] == read_smear(str(inp / "x.png"))[0][1]["name"]
    assert main(seg_args([inp], tmp_path / "out2", tiny_models, "--no-classify")) == 0
    assert saved_source(tmp_path / "out2" / "x_labels.tif") == made


def test_batch_labels_pair_with_their_smears_in_one_folder_or_two(tmp_path):
    _training_pairs(tmp_path / "one")
    for i in range(2):
        (tmp_path / "one" / f"t{i}-mask.png").rename(tmp_path / "one" / f"t{i}_labels.tif")
    # an image that is really named x_labels keeps its own mask
    Image.fromarray(smear(seed=9)).save(tmp_path / "one" / "z_labels.png")
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(tmp_path / "one" / "z_labels-mask.png")
    pairs, lone_i, lone_m = pair_images_masks(tmp_path / "one", tmp_path / "one")
    assert [(a.name, b.name) for a, b in pairs] == [("t0.png", "t0_labels.tif"), ("t1.png", "t1_labels.tif"),
                                                  ("z_labels.png", "z_labels-mask.png")]
    assert lone_i == [] and lone_m == []
    (tmp_path / "res").mkdir()
    for i in range(2):
        (tmp_path / "one" / f"t{i}_labels.tif").rename(tmp_path / "res" / f"t{i}_labels.tif")
    pairs, lone_i, lone_m = pair_images_masks(tmp_path / "one", tmp_path / "res")
    assert [(a.name, b.name) for a, b in pairs] == [("t0.png", "t0_labels.tif"), ("t1.png", "t1_labels.tif"),
                                                  ("z_labels.png", "z_labels-mask.png")]
    assert lone_i == [] and lone_m == []


# ------------------------------------------------------------------ demo
def test_demo(tiny_models, capsys):
    seg, cls = tiny_models
    assert main(["demo", "--device", "cpu", "--model", str(seg), "--classifier", str(cls)]) == 0
    out = capsys.readouterr().out
    assert "BloodImage_00000" in out and "neutrophil" in out and "basophil" in out


def test_output_to_a_closed_pipe_is_quiet(tiny_models):
    """``napari-wbc demo | head -1``: the reader closing the pipe is no error of ours (no traceback)."""
    seg, cls = tiny_models
    code = ("import sys; from napari_wbc.cli import main; "
            f"sys.exit(main(['demo', '--device', 'cpu', '--model', {str(seg)!r}, '--classifier', {str(cls)!r}]))")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# ------------------------------------------------------------------ the console script
def test_console_script(tmp_path, tiny_models):
    exe = shutil.which("napari-wbc", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if exe is None:
        pytest.skip("the napari-wbc console script is not installed (pip install -e .)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and __version__ in r.stdout
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smear()).save(inp / "s.png")
    (inp / "bad.jpg").write_bytes(b"junk")
    r = subprocess.run([exe, *seg_args([inp], tmp_path / "out", tiny_models)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    assert "bad.jpg" in r.stderr and (tmp_path / "out" / "s_labels.tif").is_file()


def test_cli_import_is_light():
    code = ("import sys, napari_wbc.cli, napari_wbc.core.batch; "
            "print(' '.join(m for m in ('torch', 'napari', 'qtpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the CLI loaded {out}"


@pytest.mark.parametrize("meanwhile", ["another image's run", "a correction saved"])
def test_outputs_written_while_an_image_is_segmented_are_kept(tmp_path, tiny_models, monkeypatch, meanwhile):
    """The replace check ran before segmenting and the outputs were written minutes later: another run's
    outputs of the same name (two runs into one folder) or a correction saved meanwhile were replaced."""
    import tifffile

    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    out = tmp_path / "out"
    settings = batch.Settings(model=str(tiny_models[0]), classifier=str(tiny_models[1]), device="cpu")
    if meanwhile == "a correction saved":
        assert batch.process_one(inp / "x.png", out, settings)["status"] == "ok"
        Image.fromarray(smear(seed=5)).save(inp / "x.png")  # the smear changed: to be done again
    other = tmp_path / "other" / "x.png"
    other.parent.mkdir()
    Image.fromarray(smear(seed=2)).save(other)
    import napari_wbc.core.segment as S

    real_iter = S.iter_segment

    def slow_segment(*a, **k):  # while this run segments, the outputs are written by someone else
        if meanwhile == "another image's run":
            monkeypatch.setattr(S, "iter_segment", real_iter)
            assert batch.process_one(other, out, settings)["status"] == "ok"
        else:
            tifffile.imwrite(out / "x_labels.tif", np.full((64, 80), 7, np.uint16))  # the user's correction
        theirs.update({f.name: f.read_bytes() for f in out.iterdir()})
        yield from real_iter(*a, **k)

    monkeypatch.setattr(S, "iter_segment", slow_segment)
    theirs = {}
    row = batch.process_one(inp / "x.png", out, settings)
    assert theirs
    assert row["status"] == "failed" and "not overwritten" in row["error"], row
    assert {f.name: f.read_bytes() for f in out.iterdir()} == theirs


def test_output_name_suffixes_never_take_another_inputs_name(tmp_path):
    p = tmp_path / "p"
    files = [p / "a.png", p / "a.tif", p / "p_a-2.png"]
    names = batch.output_names(files)
    assert len({n.lower() for n in names}) == 3 and names[2] == "p_a-2", names


def test_a_report_without_its_summary_is_kept_aside(tmp_path):
    (tmp_path / "report.html").write_text("someone's report")
    moved = batch.keep_earlier_summary(tmp_path, [])
    assert len(moved) == 1 and moved[0].read_text() == "someone's report"
    assert not (tmp_path / "report.html").exists()


def test_stale_temporaries_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    import time

    from napari_wbc.core.io import remove_stale_temporaries

    old = time.time() - 7200
    mark = ".napari-wbc-tmp"
    ours = [f".x_labels.ab3de_7h{mark}.tif", f".summary.k2j4h5g6{mark}.csv"]
    kept = [f".x_labels.ab3de_7h{mark}.csv",  # another suffix than its file's
            f".notes.abcdefgh{mark}.txt", "x_labels.tif", f".x_cells.fresh123{mark}.csv",  # not ours; too young
            ".x_labels.20240101.tif", ".x_cells.original.csv", ".summary.backup_1.csv"]  # the user's hidden files
    for n in ours + kept:
        (tmp_path / n).write_text("")
        if "fresh" not in n:
            os.utime(tmp_path / n, (old, old))
    removed = remove_stale_temporaries(tmp_path, ["x_labels.tif", "x_cells.csv", "summary.csv"])
    assert sorted(f.name for f in removed) == sorted(ours)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(kept)


def test_write_errors_name_the_file_and_long_names_fit(tmp_path, monkeypatch):
    import errno

    from napari_wbc.core.io import atomic_write

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="could not write .*report.html.*No space left"):
        atomic_write(tmp_path / "report.html", full)
    assert list(tmp_path.iterdir()) == []
    for long in (tmp_path / ("x" * 240 + "_labels.tif"), tmp_path / ("血" * 80 + "_labels.tif")):  # 251 bytes
        atomic_write(long, lambda tmp: Path(tmp).write_bytes(b"ok"))  # fits: its temporary name must too
        assert long.read_bytes() == b"ok"


def test_every_output_and_its_marker_are_written_under_the_folder_lock(tmp_path, tiny_models, monkeypatch):
    """The final marker was written after the lock was let go: another run of the same image could
    write its outputs in between, and the next run took them for corrections by hand."""
    import contextlib

    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    held, writes = [], []
    real_lock, real_write = batch.folder_lock, batch.atomic_write

    @contextlib.contextmanager
    def lock(folder):
        with real_lock(folder):
            held.append(True)
            yield
            held.pop()

    def write(path, fn):
        writes.append((Path(path).name, bool(held)))
        return real_write(path, fn)

    monkeypatch.setattr(batch, "folder_lock", lock)
    monkeypatch.setattr(batch, "atomic_write", write)
    settings = batch.Settings(model=str(tiny_models[0]), classifier=str(tiny_models[1]), device="cpu")
    assert batch.process_one(inp / "x.png", tmp_path / "out", settings)["status"] == "ok"
    assert [w for w in writes if w[0] in ("x.done", "x_labels.tif", "x_cells.csv")] == [
        ("x.done", True), ("x_labels.tif", True), ("x.done", True), ("x_cells.csv", True), ("x.done", True)]


def test_a_correction_saved_by_the_writer_while_a_run_writes_the_same_outputs_is_kept(tmp_path, tiny_models,
                                                                                      monkeypatch):
    """napari's writer did not take the batch's folder lock: labels saved while a run wrote that image's
    outputs were replaced by the run's. Now the save waits for the run, and the next run counts it."""
    import threading

    from napari_wbc._writer import write_labels

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    correction = np.zeros((64, 80), np.uint16)
    correction[5:15, 5:15] = 1
    real_write = batch._write_labels
    features = pd.DataFrame({"label": [1], "cell_type": ["basophil"]})
    saver = threading.Thread(target=write_labels, args=(str(out / "x_labels.tif"), correction, {"features": features}))

    def write_while_saving(path, labels, *source):  # the user saves in napari as the run writes
        saver.start()
        saver.join(timeout=1.0)
        real_write(path, labels, *source)

    monkeypatch.setattr(batch, "_write_labels", write_while_saving)
    settings = batch.Settings(model=str(tiny_models[0]), classifier=str(tiny_models[1]), device="cpu")
    assert batch.process_one(inp / "x.png", out, settings)["status"] == "ok"
    saver.join(timeout=30)
    assert not saver.is_alive()
    np.testing.assert_array_equal(tifffile.imread(out / "x_labels.tif"), correction)
    monkeypatch.setattr(batch, "_write_labels", real_write)
    row = batch.process_one(inp / "x.png", out, settings)
    assert row["status"] == "skipped" and row["edited"] == ["labels", "cells"], row["error"]
    assert row["n_wbc"] == 1 and row["count"]["basophil"] == 1


def test_the_writer_waits_for_a_busy_folder_only_so_long(tmp_path, monkeypatch):
    """napari's writer runs on the UI thread: a folder held by a batch run (or a hung share) must not
    freeze napari. It waits a while, then says why nothing was saved; nothing half written."""
    pytest.importorskip("fcntl")
    import time

    from napari_wbc import _writer
    from napari_wbc.core.io import FolderBusy, folder_lock

    monkeypatch.setattr(_writer, "LOCK_TIMEOUT_S", 0.3)
    labels = np.zeros((20, 20), np.uint16)
    labels[2:8, 2:8] = 1
    with folder_lock(tmp_path):  # a batch run writing here
        t0 = time.monotonic()
        with pytest.raises(FolderBusy, match="batch run"):
            _writer.write_labels(str(tmp_path / "x.tif"), labels, {})
        assert time.monotonic() - t0 < 5
    assert not list(tmp_path.iterdir())
    assert _writer.write_labels(str(tmp_path / "x.tif"), labels, {})  # free again: saved


def test_atomic_write_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """atomic_write renamed a file that might still be only in the page cache: after a power cut the
    output (a labels file, a marker) could be there under its name but empty or partly written."""
    from napari_wbc.core.io import atomic_write

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "x.done", lambda tmp: Path(tmp).write_text("{}"))
    written = (tmp_path / "x.done").stat().st_ino
    assert events == [("fsync", written), ("replace", written), ("fsync", tmp_path.stat().st_ino)], events
    assert (tmp_path / "x.done").read_text() == "{}"


def test_outputs_corrected_after_a_failed_redo_are_kept(tmp_path, tiny_models, monkeypatch):
    """The pending marker written before a redo dropped the record of the outputs as written: when the
    redo failed (disk full) and the user then corrected the outputs left, the next run replaced them."""
    import errno

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "x.png")
    settings = batch.Settings(model=str(tiny_models[0]), classifier=str(tiny_models[1]), device="cpu")
    assert batch.process_one(inp / "x.png", out, settings)["status"] == "ok"
    Image.fromarray(smear(seed=2)).save(inp / "x.png")  # the smear changed: to be done again
    real_write = batch.atomic_write

    def disk_full_at(name):
        def write(path, fn):
            if Path(path).name == name:
                raise OSError(errno.ENOSPC, f"could not write {str(path)!r}: No space left on device")
            return real_write(path, fn)
        return write

    monkeypatch.setattr(batch, "atomic_write", disk_full_at("x_labels.tif"))
    row = batch.process_one(inp / "x.png", out, settings)
    assert row["status"] == "failed" and "No space left" in row["error"]
    assert json.loads((out / "x.done").read_text())["pending"]
    monkeypatch.setattr(batch, "atomic_write", real_write)
    lab = tifffile.imread(out / "x_labels.tif")  # the user corrects the outputs left
    lab[:5, :5] = lab.max() + 1
    tifffile.imwrite(out / "x_labels.tif", lab)
    edited = (out / "x_labels.tif").read_bytes()
    row = batch.process_one(inp / "x.png", out, settings)
    assert row["status"] == "failed" and "changed after napari-wbc wrote it" in row["error"], row
    assert (out / "x_labels.tif").read_bytes() == edited

    # a redo that failed after writing the labels: those are napari-wbc's, not a correction
    (out / "x_labels.tif").unlink()
    assert batch.process_one(inp / "x.png", out, settings)["status"] == "ok"
    Image.fromarray(smear(seed=3)).save(inp / "x.png")
    monkeypatch.setattr(batch, "atomic_write", disk_full_at("x_cells.csv"))
    assert batch.process_one(inp / "x.png", out, settings)["status"] == "failed"
    monkeypatch.setattr(batch, "atomic_write", real_write)
    assert batch.process_one(inp / "x.png", out, settings)["status"] == "ok"


def test_labels_tiffs_among_the_inputs_are_left_out_and_said_so(tmp_path, tiny_models, capsys):
    """A labels TIFF in the input folder without a marker beside it (the batch's outputs copied there,
    labels saved from napari, one without any cell) was segmented as if it were a smear."""
    from napari_wbc._writer import write_labels

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "a.png")
    tifffile.imwrite(inp / "rgb.tif", smear(seed=2))
    grey = smear(seed=3).mean(-1).astype(np.uint8)
    tifffile.imwrite(inp / "grey.tif", grey)
    tifffile.imwrite(inp / "grey16.tif", grey.astype(np.uint16) * 200)
    assert main(seg_args([inp / "a.png"], out, tiny_models)) == 0
    for f in ("a_labels.tif", "a_cells.csv"):  # the batch's outputs, without their marker
        shutil.copy(out / f, inp / f)
    lab = np.zeros((64, 80), np.uint8)
    lab[10:20, 10:20], lab[30:40, 50:60] = 1, 2
    tifffile.imwrite(inp / "painted.tif", lab)  # napari's own writer: no table
    write_labels(str(inp / "corrected.tif"), lab, {})  # napari-wbc's writer
    write_labels(str(inp / "none.tif"), np.zeros((64, 80), np.uint16), {})  # no cell at all
    smears = ["a.png", "grey.tif", "grey16.tif", "rgb.tif"]
    files, notes = batch.collect_images([inp])
    assert sorted(f.name for f in files) == smears
    files, notes = batch.collect_images([inp / "painted.tif", inp / "rgb.tif"])  # named explicitly too
    assert [f.name for f in files] == ["rgb.tif"] and "painted.tif" in notes[0]
    capsys.readouterr()
    assert main(seg_args([inp], out, tiny_models)) == 0
    err = capsys.readouterr().err
    assert "left out 4 labels image(s)" in err and "painted.tif" in err and "a_labels.tif" in err
    assert sorted(pd.read_csv(out / "summary.csv")["path"].map(lambda p: Path(p).name)) == smears
    # the Python API, without collect_images: a failed row that says so, nothing written
    rows = batch.run_batch([inp / "painted.tif", inp / "a_labels.tif"], tmp_path / "api", batch.Settings(
        model=str(tiny_models[0]), classifier=str(tiny_models[1]), device="cpu"))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("is a labels image" in r["error"] and r["path"] in r["error"] for r in rows)
    assert not list((tmp_path / "api").glob("*_labels.tif"))


def test_an_input_added_beside_one_of_the_same_stem_leaves_the_earlier_outputs_their_name(tmp_path, tiny_models,
                                                                                         capsys):
    """Adding a.tif beside an earlier run's a.png renamed both outputs in_a / in_a-2: the earlier outputs,
    corrected by hand, were no longer read and a.png was segmented again. The newcomer alone is renamed."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    Image.fromarray(smear(seed=1)).save(inp / "a.png")
    assert main(seg_args([inp], out, tiny_models)) == 0
    lab = tifffile.imread(out / "a_labels.tif")
    lab[:5, :5] = lab.max() + 1  # corrected by hand
    tifffile.imwrite(out / "a_labels.tif", lab)
    edited = (out / "a_labels.tif").read_bytes()
    tifffile.imwrite(inp / "a.tif", smear(seed=2))
    Image.fromarray(smear(seed=3)).save(inp / "in_a.png")  # a newcomer already named like the disambiguation
    assert main(seg_args([inp], out, tiny_models)) == 0
    st = dict(pd.read_csv(out / "summary.csv")[["image", "status"]].values)
    assert st == {"a": "skipped", "in_a": "ok", "in_a-2": "ok"}
    assert (out / "a_labels.tif").read_bytes() == edited
    assert json.loads((out / "in_a.done").read_text())["stamp"]["source"] == str((inp / "a.tif").resolve())
    files, _ = batch.collect_images([inp])  # a.png, a.tif, in_a.png
    assert batch.output_names(files) == ["in_a", "in_a-2", "in_a-3"]  # the names of a first run
    assert batch.output_names(files, out) == ["a", "in_a", "in_a-2"]  # each keeps its earlier outputs' name
    assert main(seg_args([inp], out, tiny_models)) == 0
    assert dict(pd.read_csv(out / "summary.csv")[["image", "status"]].values) == {
        "a": "skipped", "in_a": "skipped", "in_a-2": "skipped"}


def test_atomic_write_survives_a_file_system_without_fsync(tmp_path, monkeypatch):
    """A file system that cannot fsync (EINVAL/ENOTSUP from some FUSE/SMB mounts) still gets every write
    (labels, CSV, markers, models); real I/O errors still raise."""
    from napari_wbc.core import io

    def no_fsync(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", no_fsync)
    io.atomic_write(tmp_path / "x.txt", lambda tmp: open(tmp, "w").write("hi"))
    assert (tmp_path / "x.txt").read_text() == "hi"
