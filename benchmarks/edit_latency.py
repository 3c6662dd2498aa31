"""How long napari's UI stalls while a user corrects cells on a large smear (Classify WBCs open).

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/edit_latency.py [--tiles 17 13] [--threads 1]
    PYTHONPATH=<other checkout>/src python benchmarks/edit_latency.py   # the same with other code

A large smear is made by tiling the bundled sample smear (640 x 480; 17 x 13 tiles = 8160 x 8320,
68 Mpx) and its labels from the shipped segmenter, one cell per tile renumbered, held as napari-wbc's
own layers hold them (uint16 when the ids fit; `--int32` for the wider type). In a napari viewer
(it needs OpenGL: run under `xvfb-run -a -s "-screen 0 1600x1000x24"` on a machine without a display) the Classify WBCs widget follows the labels layer, then:

1. the cells are classified (shipped classifier);
2. a new cell is painted (a disc with a new label, as the brush does: one paint event);
3. a cell is erased with the fill tool;
4. the erase is undone (the cell comes back and is typed again);
5. the layer is refreshed without any change (napari does this on many occasions);
6. the Segment WBCs widget segments the whole smear (shipped model; a new labels layer).

A 10 ms timer runs on the GUI thread; for each step the longest gap between its ticks, from the
action until the widget's table has followed it, is the longest stall a user would see, and the
total is the time until the table shows the change. The action itself (napari painting into the
layer, or the click on Classify) is timed apart: after it, every stall is the widget's following.
Compare runs of one session only.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs=2, default=(17, 13), metavar=("ROWS", "COLS"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--int32", action="store_true", help="give napari the labels as int32 (as before uint16 layers)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import napari
    import numpy as np
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    import napari_wbc
    from napari_wbc._sample_data import make_sample_data
    from napari_wbc.core.segment import cell_features

    [(rgb, _, _)] = make_sample_data()
    lab1 = napari_wbc.segment(rgb, device="cpu")
    n1 = int(lab1.max())
    assert n1 >= 1, "the shipped segmenter found no cell on the sample"
    rows, cols = args.tiles
    image = np.tile(rgb, (rows, cols, 1))
    labels = np.zeros(image.shape[:2], np.int32)
    h, w = lab1.shape
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        labels[r * h:(r + 1) * h, c * w:(c + 1) * w] = np.where(lab1 > 0, lab1 + k * n1, 0)
    n = int(labels.max())
    results = {"size": list(image.shape[:2]), "mpx": round(image.shape[0] * image.shape[1] / 1e6, 1), "cells": n}
    try:  # the layer as napari-wbc makes it (Segment, the reader): uint16 when the ids fit
        from napari_wbc.core.io import labels_for_layer
    except ImportError:  # code before labels_for_layer: int32
        labels_for_layer = None
    if labels_for_layer is not None and not args.int32:
        labels = labels_for_layer(labels)
    results["dtype"] = str(labels.dtype)

    viewer = napari.Viewer(show=False)
    viewer.add_image(image, name="smear", rgb=True)
    layer = viewer.add_labels(labels, name="smear WBC labels", features=cell_features(labels),
                              metadata={"napari_wbc": {"image_layer": "smear"}})
    app = QApplication.instance()
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)

    def spin(until, limit=600.0):
        end = time.perf_counter() + limit
        while not until():
            if time.perf_counter() > end:
                raise TimeoutError("the widget did not follow the change")
            app.processEvents()
            time.sleep(0.002)

    def worst_gap(t0, t1):
        ts = [t0] + [t for t in ticks if t0 <= t <= t1] + [t1]
        return max(b - a for a, b in zip(ts, ts[1:]))


    def step(name, action, until):
        spin(lambda: True)
        t0 = time.perf_counter()
        action()
        blocked = time.perf_counter() - t0
        spin(until)
        t1 = time.perf_counter()
        spin(lambda: True)
        results[name] = {"action_blocks": round(blocked, 3), "longest_stall": round(worst_gap(t0, t1), 3),
                         "stall_after_action": round(worst_gap(t0 + blocked, t1), 3),
                         "until_followed": round(t1 - t0, 3)}
        print(name, results[name], flush=True)

    t0 = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify WBCs")
    widget.device_combo.set_device("cpu")
    results["open_blocks"] = round(time.perf_counter() - t0, 3)
    thread = getattr(widget.device_combo, "_thread", None)
    if thread is not None:
        spin(lambda: not thread.is_alive())
    spin(lambda: True)
    time.sleep(0.5)

    def idle():
        return not widget.running and getattr(widget, "_sync_worker", None) is None and not widget._sync_timer.isActive()

    def typed(label):
        f = layer.features.set_index("label")
        return label in f.index and f.loc[label, "cell_type"] is not None and str(f.loc[label, "cell_type"]) != "nan"

    step("classify all", lambda: widget.classify(), lambda: idle() and typed(1))
    new = n + 1
    yy, xx = np.mgrid[:h, :w]
    disc = np.nonzero((yy - 60) ** 2 + (xx - 60) ** 2 <= 25 ** 2)  # a corner of the first tile, no cell there
    assert not labels[disc].any()
    step("paint a new cell", lambda: layer.data_setitem(disc, new), lambda: idle() and typed(new))
    cy, cx = (int(v) for v in layer.features.set_index("label").loc[2, ["centroid-0", "centroid-1"]])
    assert layer.data[cy, cx] == 2
    step("erase a cell (fill 0)", lambda: layer.fill((cy, cx), 0),
         lambda: idle() and 2 not in set(layer.features["label"]))
    step("undo the erase", layer.undo, lambda: idle() and typed(2))
    before = len(ticks)
    step("refresh, no change", layer.refresh, lambda: len(ticks) > before + 50 and idle())
    _, seg = viewer.window.add_plugin_dock_widget("napari-wbc", "Segment WBCs")
    seg.device_combo.set_device("cpu")
    thread = getattr(seg.device_combo, "_thread", None)
    if thread is not None:
        spin(lambda: not thread.is_alive())
    count = len(viewer.layers)
    step("segment the smear", seg.segment, lambda: not seg.running and len(viewer.layers) > count)
    print(json.dumps(results))
    viewer.close()


if __name__ == "__main__":
    main()
