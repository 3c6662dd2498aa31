"""How long a napari user waits: opening the Segment widget and the first click, in a fresh process.

    python benchmarks/widget_latency.py [--threads 1] [--runs 2]
    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/widget_latency.py   # on a machine without a display

Each run is a new Python process (nothing imported, nothing cached, as when napari starts):
a napari viewer (hidden window; it needs OpenGL, hence a display), the bundled sample smear as
an image layer, then

1. the Segment WBCs widget opened through the manifest: how long napari's UI thread is blocked;
2. with the background preload (the default): the time until it has finished (torch imported,
   the shipped model loaded, one tiny run), spent in a thread while the UI stays free;
3. the first click on Segment: how long the click blocks the UI thread, and the time from the
   click to the labels layer.

A 10 ms timer runs on the GUI thread throughout; the longest gap between its ticks is the longest
stall a user would see (background threads still take Python's interpreter lock, e.g. while torch's
libraries load).

The same with ``NAPARI_WBC_PRELOAD=0`` (everything happens on the first click) is the comparison.
Timings depend on the machine and on what else runs; compare runs of the same session only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

from napari_wbc._sample_data import make_sample_data

viewer = napari.Viewer(show=False)
[(rgb, meta, _)] = make_sample_data()
viewer.add_image(rgb, name="smear", rgb=True)
app = QApplication.instance()
ticks = []  # a 10 ms timer on the GUI thread: gaps between its ticks are what a user sees as stalls
timer = QTimer()
timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
timer.start(10)


def spin(seconds=None, until=None):
    end = time.perf_counter() + (seconds or 0)
    while (until() if until else time.perf_counter() < end):
        app.processEvents()
        time.sleep(0.002)


def worst_gap(t_from, t_to):
    ts = [t_from] + [t for t in ticks if t_from <= t <= t_to] + [t_to]
    return max(b - a for a, b in zip(ts, ts[1:]))


spin(0.3)
t0 = time.perf_counter()
_, widget = viewer.window.add_plugin_dock_widget("napari-wbc", "Segment WBCs")
t_open = time.perf_counter() - t0
t_preload = None
thread = getattr(widget.device_combo, "_thread", None)  # absent in versions without the preload
if thread is not None and os.environ.get("NAPARI_WBC_PRELOAD") != "0":
    spin(until=thread.is_alive)
    t_preload = time.perf_counter() - t0
spin(0.1)
t_idle = time.perf_counter()
t1 = time.perf_counter()
widget.segment()
t_block = time.perf_counter() - t1
spin(until=lambda: widget.running)
t2 = time.perf_counter()
t_click = t2 - t1
spin(0.05)
cells = int(max(layer.data.max() for layer in viewer.layers if layer.name.endswith("WBC labels")))
print(json.dumps({"open": t_open, "preload": t_preload, "stall_open": worst_gap(t0, t_idle),
                  "click_blocks": t_block, "first_click": t_click, "stall_click": worst_gap(t1, t2), "cells": cells}))
viewer.close()
"""


def one(preload: bool, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["NAPARI_WBC_PRELOAD"] = "1" if preload else "0"
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2, help="fresh processes per setting (alternating)")
    args = ap.parse_args(argv)
    rows = []
    for _ in range(args.runs):
        for preload in (True, False):
            r = one(preload, args.threads)
            rows.append((preload, r))
            print(("preload " if preload else "on click") + f": {json.dumps(r)}", flush=True)
    print()
    print("| setting | widget opens: UI blocked, s | background preload, s | longest stall from opening to "
          "idle, s | first click: UI blocked, s | first click to labels, s | longest stall during it, s | cells |")
    print("|---|---|---|---|---|---|---|---|")
    for preload, r in rows:
        pre = f"{r['preload']:.2f}" if r["preload"] is not None else "-"
        name = "preload (default)" if preload else "`NAPARI_WBC_PRELOAD=0`"
        print(f"| {name} | {r['open']:.2f} | {pre} | {r['stall_open']:.2f} | {r['click_blocks']:.2f} "
              f"| {r['first_click']:.2f} | {r['stall_click']:.2f} | {r['cells']} |")


if __name__ == "__main__":
    main()
