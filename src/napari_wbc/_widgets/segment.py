"""Segment WBCs dock widget: image -> ``<image> WBC labels`` (features = per-cell table).

The work is :func:`napari_wbc.core.segment.iter_segment`, run in a thread
worker; this module only turns its output into a layer.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from napari.viewer import Viewer
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QWidget,
)

from napari_wbc.core.batch import STATUS_FAILED
from napari_wbc.core.io import labels_for_layer
from napari_wbc.core.segment import cell_features

from ._common import (
    scroll_layout,
    CancelWhenRemoved,
    META_KEY,
    DeviceCombo,
    LayerCombo,
    ModelCombo,
    RunButtons,
    data_hash,
    error_message,
    find_widgets,
    layer_image,
    make_progress,
    model_preload,
    layer_id,
    layer_level0,
    paired_image,
    plane_transform,
    register,
    reset_progress,
    start_worker,
    unwrap_viewer,
    wbc_meta,
)

LABELS_SUFFIX = "WBC labels"


def segment_job(image, *, model, device, diameter, classify_model=None, classify: bool = False):
    """Generator run by the worker: yields ``(stage, ...)`` items, returns ``(labels, diameter, table,
    measured)``.

    ``stage`` is ``"diameter"`` or ``"progress"`` (segmentation tiles) or
    ``"classify"`` (classification progress). ``table`` is None unless ``classify``.
    ``labels`` are as the layer will hold them (:func:`~napari_wbc.core.io.labels_for_layer`:
    uint16 when the ids fit) and ``measured`` is their ``(data_hash, cell_features)``, made here so
    the GUI thread does not (about half a second on a 70 Mpx smear).
    """
    from napari_wbc.core.segment import iter_segment

    image = np.asarray(image)  # a lazy (dask) layer is computed here, in the worker
    labels, d = None, diameter
    for item in iter_segment(image, model=model, device=device, diameter=diameter):
        if item[0] == "labels":
            labels = item[1]
        else:
            if item[0] == "diameter":
                d = item[1]
            yield item
    table = None
    if classify and labels is not None and labels.max() > 0:
        from napari_wbc.core.classify import iter_classify

        for item in iter_classify(image, labels, model=classify_model, device=device):
            if item[0] == "progress":
                yield ("classify", item[1], item[2])
            elif item[0] == "table":
                table = item[1]
    measured = None
    if labels is not None:
        labels = labels_for_layer(labels)
        measured = (data_hash(labels), cell_features(labels))
    return labels, d, table, measured


FOLDER_OUT = "napari-wbc"  # where "Segment a folder" writes, inside the images' folder (unless chosen)


def folder_job(files, out_dir, settings, info: dict, stop):
    """Generator run by the worker for "Segment a folder": the batch tool's work
    (:func:`napari_wbc.core.batch.iter_batch`, one image after another), yielding ``("image", done,
    total, row)`` as each image's outputs are written; returns ``(rows, kept)`` once ``summary.csv`` and
    ``report.html`` are written (``kept``: an earlier summary moved aside). ``stop``: a
    :class:`threading.Event`; once set, the run ends after the image being segmented (saved first), and
    the summary lists the images done."""
    import time

    from napari_wbc.core import batch

    t0 = time.perf_counter()
    rows = []
    for i, row in batch.iter_batch(files, out_dir, settings, stop=stop.is_set):
        rows.append(row)
        yield ("image", i + 1, len(files), row)
    info = {**info, "wall time": f"{time.perf_counter() - t0:.1f} s"}
    if stop.is_set() and len(rows) < len(files):
        info["stopped"] = f"cancelled after {len(rows)} of {len(files)} images"
    kept = batch.finish_run(rows, info, out_dir) if rows else []
    return rows, kept


def folder_summary(rows, total: int) -> str:
    """One line on a folder run: images done, skipped, failed, WBCs and the pooled differential."""
    from napari_wbc.core.batch import STATUS_OK, STATUS_SKIPPED, pooled_counts, tally
    from napari_wbc.core.classify import OTHER, percentages

    n, cells = tally(rows)
    text = f"{len(rows)} of {total} images: {n[STATUS_OK]} segmented"
    if n[STATUS_SKIPPED]:
        text += f", {n[STATUS_SKIPPED]} done before"
    if n[STATUS_FAILED]:
        text += f", {n[STATUS_FAILED]} failed"
    text += f"; {cells} WBC{'s' if cells != 1 else ''}"
    counts = pooled_counts(rows)
    if counts:
        pct = percentages(counts)
        text += ": " + ", ".join(
            f"{c} {k}" + ("" if c == OTHER or pct.get(c) is None else f" ({pct[c]:.0f}%)")
            for c, k in counts.items() if k)
    return text


def is_painted(layer) -> bool:
    """A labels layer whose labels are not (or not known to be) as the segmenter made them."""
    meta = wbc_meta(layer)
    return meta.get("data_hash") is None or meta.get("data_hash") != data_hash(layer_image(layer))


def any_corrected(features) -> bool:
    """Whether a labels layer's ``features`` hold a type set by hand (Classify's ``corrected``)."""
    return features is not None and "corrected" in features and bool(np.asarray(features["corrected"], bool).any())


def is_untouched(layer) -> bool:
    """A labels layer still exactly as the segmenter made it (no painting, no corrected type)."""
    return not is_painted(layer) and not any_corrected(getattr(layer, "features", None))


class SegmentWidget(CancelWhenRemoved, QWidget):
    """Segment the white blood cells of an image layer into a labels layer."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.worker = None
        self._cancelled = False
        self._job = None  # what the running worker was asked (image name, scale, model...)
        self._queue = []  # weak references to the images still to segment in this run (segment_new)
        self._batch = None  # [images in the run, labels layers added] while segment_new runs

        self.image_combo = LayerCombo(napari_viewer, Image, follow_new=True)
        self.model_combo = ModelCombo("segmenter")
        # lists the devices, then loads the chosen model: both in the background
        self.device_combo = DeviceCombo(then=model_preload(self.model_combo))
        self.auto_diameter = QCheckBox("auto")
        self.auto_diameter.setChecked(True)
        self.auto_diameter.setToolTip("estimate the WBC diameter from the red cells")
        self.diameter = QDoubleSpinBox()
        self.diameter.setRange(4.0, 2000.0)
        self.diameter.setDecimals(1)
        self.diameter.setValue(60.0)
        self.diameter.setSuffix(" px")
        self.diameter.setEnabled(False)
        self.auto_diameter.toggled.connect(lambda on: self.diameter.setEnabled(not on))
        self.classify_check = QCheckBox("classify cells")
        self.classify_check.setToolTip(
            "also type each cell (with the Classify widget's model when it is open, else the classifier trained "
            "together with the chosen segmenter, else the shipped classifier)"
        )
        self.buttons = RunButtons("Segment")
        self.buttons.run.clicked.connect(lambda: self.segment())
        self.buttons.cancel.clicked.connect(self.cancel)
        self.new_button = QPushButton("Segment every new image")
        self.new_button.setToolTip(
            "segment, one after another, every image layer that has no labels layer made from it yet (the fields "
            "of a slide: open them all, click once; open more, click again), with the settings above")
        self.new_button.clicked.connect(lambda: self.segment_new())
        self.folder_button = QPushButton("Segment a folder...")
        self.folder_button.setToolTip(
            "segment (and type) every image file of a folder, without opening them, with the settings above; "
            f"the labels, cell tables, summary.csv and report.html go to a folder '{FOLDER_OUT}' inside it, "
            "as the napari-wbc command writes them (images done before are not done again)")
        self.folder_button.clicked.connect(self._pick_folder)
        self._folder = None  # while a folder runs: {"files", "out", "stop", "rows" (those done)}
        self.results = QLabel("")  # links to the last folder run's report and results
        self.results.setOpenExternalLinks(True)
        self.results.setWordWrap(True)
        self.results.hide()
        self.progress = make_progress()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        dia = QHBoxLayout()
        dia.addWidget(self.auto_diameter)
        dia.addWidget(self.diameter, 1)
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("model", self.model_combo)
        form.addRow("device", self.device_combo)
        form.addRow("WBC diameter", dia)
        lay = scroll_layout(self)
        lay.addLayout(form)
        lay.addWidget(self.classify_check)
        lay.addWidget(self.buttons)
        lay.addWidget(self.new_button)
        lay.addWidget(self.folder_button)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addWidget(self.results)
        lay.addStretch(1)
        register(self)

    # ------------------------------------------------------------ public
    def add_model(self, path, select: bool = True) -> Path:
        """Add a segmenter model file to the list (and select it); returns its checked path."""
        return self.model_combo.add_model(path, select=select)

    def set_diameter(self, value: float | None) -> None:
        """None = auto (estimated), else the WBC diameter in pixels."""
        self.auto_diameter.setChecked(value is None)
        if value is not None:
            self.diameter.setValue(float(value))

    @property
    def running(self) -> bool:
        return self.worker is not None

    def segment(self, layer=None):
        """Start segmenting the chosen image (or ``layer``); returns the worker (None when nothing started)."""
        if self.running:
            return None
        layer = self.image_combo.layer() if layer is None else layer
        if layer is None:
            show_error("Segment WBCs: open an image first (no image layer to segment)")
            return None
        models = self._chosen_models()
        if models is None:
            return None
        model, classify, classify_model = models
        image = layer_level0(layer)  # a lazy array is loaded by the worker, not here
        if image.ndim > (3 if getattr(layer, "rgb", False) else 2):  # a stack (z, time) of grey or RGB planes
            show_error(
                f"Segment WBCs: layer {layer.name!r} has shape {image.shape}; expected a single 2-D image "
                "(grey or RGB). Split stacks or open the image as RGB."
            )
            return None
        diameter = None if self.auto_diameter.isChecked() else float(self.diameter.value())
        self._cancelled = False
        self._job = {"image": layer.name, "transform": plane_transform(layer), "model": str(model),
                     "layer": weakref.ref(layer), "image_id": layer_id(layer), "estimated": diameter is None,
                     "classifier": classify_model}
        self._set_busy(True)
        self.progress.setRange(0, 0)
        self.progress.setFormat("starting...")
        self.status.setText(f"segmenting {layer.name}{self._of()}...")
        self.worker = start_worker(
            segment_job,
            image,
            model=model,
            device=self.device_combo.device(),
            diameter=diameter,
            classify=classify,
            classify_model=classify_model,
            on_yield=self._on_yield,
            on_return=self._on_return,
            on_error=self._on_error,
            on_finish=self._on_finish,
            owner=self,
        )
        return self.worker

    def new_images(self) -> list:
        """The image layers that no labels layer in the viewer was made from (:func:`paired_image`)."""
        made_from = {id(paired_image(self.viewer, lyr)) for lyr in self.viewer.layers
                     if isinstance(lyr, Labels) and wbc_meta(lyr)}
        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Image) and id(lyr) not in made_from]

    def segment_new(self):
        """Segment every image layer not segmented yet (:meth:`new_images`), one after another with the
        widget's settings; returns the first worker (None when nothing started). Cancel stops the run:
        the images done keep their labels layers, the one being segmented gets none."""
        if self.running:
            return None
        images = self.new_images()
        if not images:
            msg = "Segment WBCs: every open image has its labels layer already (segment one again with 'Segment')"
            self.status.setText(msg)
            show_info(msg)
            return None
        self._queue = [weakref.ref(lyr) for lyr in images]
        self._batch = [len(images), 0]
        return self._segment_next()

    def _segment_next(self):
        """Start the next image of :meth:`segment_new`'s run that can be segmented (a removed one is
        passed over; one refused, a stack say, is said so and passed over); None when none is left."""
        while self._queue:
            layer = self._queue.pop(0)()
            if layer is None or layer not in self.viewer.layers:
                continue
            self.image_combo.set_layer(layer)
            worker = self.segment(layer)
            if worker is not None:
                return worker
        self._batch = None
        return None

    def segment_folder(self, folder, out_dir=None):
        """Segment (and, with "classify cells", type) every image file in ``folder`` as the batch tool
        does (``napari-wbc segment FOLDER --out OUT``), with the widget's settings, in a worker thread:
        labels, cell tables, ``summary.csv`` and ``report.html`` go to ``out_dir`` (default: a folder
        ``napari-wbc`` inside ``folder``). Nothing is opened in the viewer. Images whose outputs are there
        from an earlier run are not done again (corrected by hand, they are counted as corrected); nothing
        is overwritten. Cancel ends the run after the image being segmented. Returns the worker, or None
        when nothing started (the reason shown)."""
        import threading

        from napari_wbc.core import batch

        if self.running:
            return None
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            show_error(f"Segment WBCs: {str(folder)!r} is not a folder; expected a folder of smear images")
            return None
        out_dir = (folder / FOLDER_OUT if out_dir is None else Path(out_dir).expanduser()).absolute()
        models = self._chosen_models()
        if models is None:
            return None
        model, classify, classifier = models
        files, notes = batch.collect_images([folder], exclude=[out_dir])
        if not files:
            show_error(f"Segment WBCs: no image files ({', '.join(batch.IMAGE_SUFFIXES)}) in {str(folder)!r}")
            return None
        problem = _write_problem(out_dir)  # before any image is done, not after all of them
        if problem is not None:
            show_error(f"Segment WBCs: the results cannot be written to {str(out_dir)!r} ({problem}); "
                       "choose another folder for them")
            return None
        diameter = None if self.auto_diameter.isChecked() else float(self.diameter.value())
        device = self.device_combo.device()
        settings = batch.Settings(model=str(model), classifier=None if classifier is None else str(classifier),
                                  classify=classify, device=device, diameter=diameter)
        info = batch.run_info(settings, out_dir, "napari: Segment WBCs > Segment a folder")
        for note in notes:
            show_info(f"Segment WBCs: {note}")
        stop = threading.Event()
        self._folder = {"files": files, "out": out_dir, "stop": stop, "rows": []}
        self._set_busy(True)
        self.results.hide()
        self.progress.setRange(0, len(files))
        self.progress.setValue(0)
        self.progress.setFormat(f"0/{len(files)} images")
        self.status.setText(f"folder {folder.name}: segmenting {files[0].name} (image 1 of {len(files)})...")
        self.worker = start_worker(
            folder_job, files, out_dir, settings, info, stop,
            on_yield=self._on_folder_image,
            on_return=self._on_folder_return,
            on_error=self._on_error,
            on_finish=self._on_folder_finish,
            owner=self,
        )
        return self.worker

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Segment every smear image in a folder")
        if not folder:
            return
        out_dir = Path(folder) / FOLDER_OUT
        if _write_problem(out_dir) is not None:  # (a read-only share of images, say): the results go elsewhere
            chosen = QFileDialog.getExistingDirectory(
                self, f"{str(out_dir)!r} cannot be written: save the results in", str(Path.home()))
            if not chosen:
                return
            out_dir = Path(chosen) / FOLDER_OUT
        self.segment_folder(folder, out_dir)

    def _on_folder_image(self, item) -> None:
        _, done, total, row = item
        run = self._folder
        run["rows"].append(row)
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"{done}/{total} images")
        if row["status"] == STATUS_FAILED:
            show_error(f"Segment WBCs: {row['error']}")
        if run["stop"].is_set():
            return
        sofar = folder_summary(run["rows"], total)
        if done < total:
            self.status.setText(f"{sofar}; segmenting {run['files'][done].name} (image {done + 1} of {total})...")

    def _on_folder_return(self, result) -> None:
        rows, kept = result
        run = self._folder
        total = len(run["files"])
        if not rows:  # cancelled before the first image was done: nothing written, no summary
            self.status.setText(f"cancelled before any of the {total} images was segmented; nothing was written")
            return
        text = folder_summary(rows, total)
        if len(rows) < total:
            text = f"cancelled: {text}"
        if kept:
            text += "; the earlier summary lists other images: kept as " + ", ".join(k.name for k in kept)
        self.status.setText(f"{text}; results in {run['out']}")
        show_info(f"Segment WBCs: {text}")
        out = run["out"]
        # (Qt's own dark blue is unreadable on napari's dark theme)
        link = '<a style="color:#4a9eff" href="{}">{}</a>'.format
        self.results.setText(" &middot; ".join((link((out / "report.html").as_uri(), "report.html"),
                                                link((out / "summary.csv").as_uri(), "summary.csv"),
                                                link(out.as_uri(), "results folder"))))
        self.results.show()

    def _on_folder_finish(self) -> None:
        self._folder = None
        self.worker = None
        self._set_busy(False)
        reset_progress(self.progress)

    def _set_busy(self, busy: bool) -> None:
        self.buttons.set_busy(busy)
        self.new_button.setEnabled(not busy)
        self.folder_button.setEnabled(not busy)

    def cancel(self) -> None:
        """Stop the running segmentation (and the rest of a :meth:`segment_new` run); no layer is added
        or changed for the image being segmented. A folder run ends after the image being segmented,
        whose outputs are saved, and writes the summary of the images done."""
        if self._folder is not None:
            self._folder["stop"].set()
            self.status.setText("cancelling: the image being segmented is finished and saved first...")
            return
        self._queue = []
        if self.worker is not None:
            self._cancelled = True
            self.status.setText("cancelling...")
            self.worker.quit()

    # ------------------------------------------------------------ worker slots
    def _chosen_models(self):
        """``(segmenter, classify, classifier)`` as chosen (``classifier`` None unless ``classify``), or
        None when a model is missing (said in an error notification)."""
        model = self.model_combo.model_path()
        if model is None:
            show_error(
                "Segment WBCs: no segmentation model available (the shipped model is missing); "
                "choose a model file with 'Browse...'"
            )
            return None
        classify = self.classify_check.isChecked()
        classifier = self._classifier_choice() if classify else None
        if classify and classifier is None:
            show_error(
                "Segment WBCs: 'classify cells' needs a classifier model (the shipped one is missing); "
                "open the Classify WBCs widget and choose one with 'Browse...'"
            )
            return None
        return model, classify, classifier

    def _classifier_choice(self):
        from .classify import ClassifyWidget

        from napari_wbc.core.models import SHIPPED

        widgets = find_widgets(self.viewer, ClassifyWidget)
        if widgets:
            return widgets[-1].model_combo.model_path()
        paired = self._paired_classifier()
        if paired is not None:
            return paired
        return SHIPPED["classifier"] if SHIPPED["classifier"].exists() else None

    def _paired_classifier(self):
        """The classifier fine-tuned together with the chosen segmenter (its card's ``classifier``), if any."""
        from napari_wbc.core.finetune import classifier_for

        return classifier_for(self.model_combo.model_path())

    def _of(self) -> str:
        """`` (image k of n)`` while :meth:`segment_new` works through several images, else ''."""
        if self._batch is None or self._batch[0] < 2:
            return ""
        total = self._batch[0]
        return f" (image {total - len(self._queue)} of {total})"  # (the queue holds the ones not started)

    def _on_yield(self, item) -> None:
        kind = item[0]
        if kind == "diameter":
            self.status.setText(f"segmenting {self._job['image']}{self._of()} (WBC diameter {item[1]:.0f} px)...")
        elif kind == "stage":
            self.status.setText(f"{self._job['image']}{self._of()}: {item[1]}...")
        elif kind in ("progress", "outlining", "classify"):
            done, total = int(item[1]), max(int(item[2]), 1)
            self.progress.setRange(0, total)
            self.progress.setValue(done)
            what = {"progress": "tiles", "outlining": "cells outlined", "classify": "cells classified"}[kind]
            self.progress.setFormat(f"{done}/{total} {what}")

    def _on_return(self, result) -> None:
        if self._cancelled:
            return
        labels, diameter, table, measured = result
        job = self._job
        image_layer = job["layer"]() if "layer" in job else None
        if "layer" in job and (image_layer is None or image_layer not in self.viewer.layers):
            msg = f"Segment WBCs: the image {job['image']!r} was removed while it was segmented; no layer was added"
            self.status.setText(msg)
            show_info(msg)
            return
        if image_layer is not None and image_layer.name != job["image"]:  # renamed meanwhile
            job = {**job, "image": image_layer.name}
        try:
            layer = self.put_labels(labels, job, diameter, measured=measured)
            if table is not None:
                from .classify import apply_classification

                apply_classification(self.viewer, layer, table, classifier=job.get("classifier"))
        except Exception as e:  # noqa: BLE001 - reported, never a traceback dialog
            show_error(error_message("Segment WBCs: could not add the labels layer", e))
            return
        if self._batch is not None:
            self._batch[1] += 1
        n = int(len(layer.features))
        # when segmented: corrections change the count after this (Classify shows the current one)
        # the scale it was read at, so that a wrong estimate (a thick smear, say) can be seen and set by hand
        used = "" if diameter is None else (
            f" (WBC diameter {float(diameter):.0f} px, {'estimated' if job.get('estimated') else 'as set'})")
        self.status.setText(f"segmented: {n} WBC{'s' if n != 1 else ''} found in {job['image']} -> {layer.name!r}{used}")
        show_info(f"Segment WBCs: {n} white blood cell{'s' if n != 1 else ''} found in {job['image']!r}")

    def _on_error(self, exc) -> None:
        self.status.setText("failed")
        show_error(error_message("Segment WBCs failed", exc))

    def _on_finish(self) -> None:
        batch = self._batch
        if self._cancelled:
            done = "" if batch is None or batch[0] < 2 else f" ({batch[1]} of {batch[0]} images segmented before)"
            self.status.setText(f"cancelled; no layer was added for {self._job['image']}{done}")
            self._batch = None
        self.worker = None
        self._set_busy(False)
        reset_progress(self.progress)
        if self._batch is not None and not self._cancelled:
            if self._segment_next() is None and batch[0] > 1:
                self.status.setText(f"{self.status.text()}; {batch[1]} of {batch[0]} new images segmented")

    # ------------------------------------------------------------ layers
    def _target_layer(self, image_name: str, image_layer=None):
        """An untouched earlier result for this image (to replace), else None."""
        for lyr in self.viewer.layers:
            if not isinstance(lyr, Labels) or not lyr.name.startswith(f"{image_name} {LABELS_SUFFIX}"):
                continue
            ours = (paired_image(self.viewer, lyr) is image_layer if image_layer is not None
                    else wbc_meta(lyr).get("image_layer") == image_name)
            if ours and is_untouched(lyr):
                return lyr
        return None

    def _new_name(self, image_name: str) -> str:
        base = f"{image_name} {LABELS_SUFFIX}"
        names = {lyr.name for lyr in self.viewer.layers}
        if base not in names:
            return base
        n = 2
        while f"{base} [{n}]" in names:
            n += 1
        return f"{base} [{n}]"

    def put_labels(self, labels, job: dict, diameter, measured=None):
        """Add (or replace an untouched earlier) ``<image> WBC labels`` layer; returns it.

        ``measured``: ``(data_hash, cell_features)`` of ``labels`` when already made (in the worker).
        """
        labels = labels_for_layer(labels)
        digest, features = measured if measured is not None else (data_hash(labels), cell_features(labels))
        meta = {
            "image_layer": job["image"],
            "image_layer_id": job.get("image_id"),
            "model": job["model"],
            "diameter": None if diameter is None else float(diameter),
            "data_hash": digest,
        }
        image_layer = job["layer"]() if "layer" in job else None
        layer = self._target_layer(job["image"], image_layer)
        if layer is None:
            layer = self.viewer.add_labels(
                labels,
                name=self._new_name(job["image"]),
                **job.get("transform", {}),
                features=features,
                metadata={META_KEY: meta},
            )
            if diameter:  # outlines, not filled masks: the cell's morphology (what its type is judged by)
                layer.contour = max(1, int(round(float(diameter) / 25)))  # stays visible; napari can fill them
        else:
            layer.data = labels
            layer.features = features
            layer.metadata = {**layer.metadata, META_KEY: meta}
            from .classify import render_types

            render_types(self.viewer, layer)  # the old cells' types go with them (until typed again)
            self.viewer.layers.selection.active = layer
        # painting straight away draws a new cell (napari starts on label 1: a missed cell painted
        # before pressing "new label" became part of cell 1, in two pieces)
        layer.selected_label = int(features["label"].max()) + 1 if len(features) else 1
        return layer


def _write_problem(folder: Path) -> str | None:
    """None when a file can be written in ``folder`` (made if missing), else why not."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return str(e.strerror or e)
    return None


def segment_active_image(viewer: Viewer):
    """Menu command (Layers > Segment): segment the selected image with the Segment widget's settings.

    Opens (or reuses) the Segment WBCs dock widget so progress and Cancel are at
    hand; returns the worker, or None when there is no image to segment.
    """
    viewer = unwrap_viewer(viewer)
    layer = viewer.layers.selection.active
    if not isinstance(layer, Image):
        images = [lyr for lyr in viewer.layers if isinstance(lyr, Image)]
        if len(images) != 1:
            show_error("Segment WBCs: select the image layer to segment" if images else "Segment WBCs: open an image first")
            return None
        layer = images[0]
    _, widget = viewer.window.add_plugin_dock_widget("napari-wbc", "Segment WBCs")
    if widget.running:  # the picker stays on the image being segmented
        show_info(f"Segment WBCs is still segmenting {widget._job['image']!r}: wait for it or cancel it, "
                  f"then segment {layer.name!r}")
        return None
    widget.image_combo.set_layer(layer)
    return widget.segment()
