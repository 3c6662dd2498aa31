"""A slide in napari: many fields segmented and typed with one click, counted together.

    python benchmarks/slide_workflow.py [--fields 20] [--threads 2] [--folder]
    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/slide_workflow.py   # without a display

Opens the first N unlabelled SigTuple fields (none of them in any training split: the SigTuple
training masks are of other images) in a napari viewer (hidden window; it needs OpenGL, hence a
display), presses the Segment widget's "Segment every new image" with "classify cells" (shipped models,
CPU, diameter auto) and sets the Classify widget's count to the slide. Reports:

- the time from the click to the last field's labels layer, per field;
- the longest stall of napari's GUI thread meanwhile (a 10 ms timer on it; gaps between its ticks);
- the slide's differential count, and whether it equals the batch tool's on the same files
  (``napari-wbc segment FILES --out DIR``: its summary.csv, cell by cell type, image by image).

With ``--folder`` the fields are not opened: the Segment widget's "Segment a folder..." is pressed on a
folder holding them (links), and its summary.csv is compared with the batch tool's the same way.

Timings depend on the machine and on what else runs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wbc_data  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", action="store_true", help="press 'Segment a folder...' instead")
    a = ap.parse_args(argv)

    import napari
    import pandas as pd
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    torch.set_num_threads(a.threads)
    files = sorted((wbc_data.DATA / "sigtuple/unlabeled").glob("*.jpg"))[: a.fields]
    viewer = napari.Viewer(show=False)
    if not a.folder:
        for f in files:
            viewer.open(str(f), plugin="napari-wbc")
    _, seg = viewer.window.add_plugin_dock_widget("napari-wbc", "Segment WBCs")
    _, cls = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify WBCs")
    seg.device_combo.set_device("cpu")
    cls.device_combo.set_device("cpu")
    seg.classify_check.setChecked(True)
    app = QApplication.instance()

    def spin(until):
        while not until():
            app.processEvents()
            time.sleep(0.002)

    # the models loaded and warm (as after the widgets' background preload), so the run is what a click costs
    from napari_wbc.core.models import load_model

    load_model(seg.model_combo.model_path(), "segmenter", "cpu")
    load_model(cls.model_combo.model_path(), "classifier", "cpu")
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    work = tempfile.TemporaryDirectory()
    if a.folder:  # the fields in a folder of their own (links), the results in a folder inside it
        for f in files:
            (Path(work.name) / f.name).symlink_to(f)
    t0 = time.perf_counter()
    if a.folder:
        assert seg.segment_folder(work.name) is not None
        spin(lambda: not seg.running)
    else:
        assert seg.segment_new() is not None
        spin(lambda: not seg.running and seg._batch is None)
    t1 = time.perf_counter()
    timer.stop()
    ts = [t0] + [t for t in ticks if t0 <= t <= t1] + [t1]
    worst = max(b - c for c, b in zip(ts, ts[1:]))
    if a.folder:
        done = pd.read_csv(Path(work.name) / "napari-wbc" / "summary.csv")
        per_layer = {}
        for _, row in done.iterrows():
            cells = pd.read_csv(Path(work.name) / "napari-wbc" / f"{row['image']}_cells.csv")
            per_layer[row["image"]] = cells
        widget_counts = pd.concat(per_layer.values())["cell_type"].value_counts()
        status = seg.status.text()
    else:
        cls.set_slide_scope(True)
        widget_counts = cls.counts().set_index("cell_type")["count"]
        status = cls.total_label.text()
        from napari.layers import Labels

        per_layer = {lyr.metadata["napari_wbc"]["image_layer"]: lyr.features for lyr in viewer.layers
                     if isinstance(lyr, Labels)}

    from napari_wbc.cli import main as cli

    with tempfile.TemporaryDirectory() as out:
        rc = cli(["segment", *map(str, files), "--out", out, "--device", "cpu"])
        summary = pd.read_csv(Path(out) / "summary.csv")
    same = rc == 0
    for _, row in summary.iterrows():
        f = per_layer.get(row["image"])
        mine = {} if f is None or "cell_type" not in f else f["cell_type"].value_counts().to_dict()
        theirs = {c[2:]: int(row[c]) for c in summary.columns if c.startswith("n_") and c != "n_wbc"
                  and pd.notna(row[c]) and int(row[c])}
        if mine != theirs:
            same = False
            print(f"differs on {row['image']}: napari {mine}, batch {theirs}")
    n = int(sum(len(f) for f in per_layer.values()))
    lines = [
        f"{len(files)} SigTuple fields, {torch.get_num_threads()} torch threads, shipped models on the CPU, "
        + ("'Segment a folder...'" if a.folder else "'Segment every new image'"),
        "",
        f"| fields | WBCs | click to {'summary written' if a.folder else 'last layer'} (s) | s per field | longest GUI stall (ms) | slide count equals the batch tool's |",
        "|---|---|---|---|---|---|",
        f"| {len(files)} | {n} | {t1 - t0:.1f} | {(t1 - t0) / len(files):.2f} | {worst * 1000:.0f} | {'yes' if same else 'NO'} |",
        "",
        "slide count: " + ", ".join(f"{k} {int(v)}" for k, v in widget_counts.items()),
        status,
    ]
    print("\n".join(lines))
    viewer.close()
    work.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
