"""Train from corrections dock widget: fine-tune the segmenter on corrected labels layers.

The work is :func:`napari_wbc.core.finetune.finetune`, run in a thread worker;
progress comes back through a Qt signal, Cancel sets its ``should_stop`` flag.
The new model is written atomically by the core (a cancelled run writes nothing)
and handed to the Segment widget's model list.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_wbc.core.classifier_finetune import corrected_types, present_ids
from napari_wbc.core.classify import OTHER

from ._common import (
    ProgressRelay,
    scroll_layout,
    CancelWhenRemoved,
    DeviceCombo,
    ModelCombo,
    RunButtons,
    alive,
    error_message,
    find_widgets,
    layer_image,
    layer_level0,
    make_progress,
    register,
    start_worker,
    unwrap_viewer,
    paired_image,
    wbc_meta,
    reset_progress,
)
from .segment import any_corrected, is_painted, is_untouched

NO_IMAGE = "(choose image)"
AUTO_CLASSIFIER = "auto: the one that typed the cells"


def _held_out_cells(metrics: dict) -> int | None:
    """The number of cells the hold-out figures were measured on (found + missed), if known."""
    tp, fn = metrics.get("tp"), metrics.get("fn")
    return None if tp is None or fn is None else int(tp) + int(fn)


def _score_text(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


class TrainWidget(CancelWhenRemoved, QWidget):
    """Fine-tune the WBC segmenter on the labels layers you corrected."""

    COLS = ("use", "labels", "image")

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.worker = None
        self._stop = threading.Event()  # read by the worker thread; not a Qt object
        self._job = None
        self._use: dict[int, bool] = {}  # id(labels layer) -> included, as the user ticked it
        self._auto: dict[int, bool] = {}  # id(labels layer) -> included unless the user said: corrected ones
        self._typed_only: set[int] = set()  # ids of layers ticked for types set by hand (not painted): an
        # undo of those in Classify unticks them again
        self._image_pick: dict[int, str] = {}  # id(labels layer) -> image layer name

        self.pairs_table = QTableWidget(0, len(self.COLS))
        self.pairs_table.setHorizontalHeaderLabels(list(self.COLS))
        self.pairs_table.verticalHeader().setVisible(False)
        header = self.pairs_table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.pairs_table.itemChanged.connect(self._on_item_changed)

        self.model_combo = ModelCombo("segmenter")
        self.model_combo.setToolTip("the model to start from")
        from napari_wbc.core.finetune import DEFAULT_EPOCHS, STEPS_PER_EPOCH

        self.auto_epochs = QCheckBox("auto")
        self.auto_epochs.setChecked(True)
        self.auto_epochs.setToolTip(f"{DEFAULT_EPOCHS} epochs of {STEPS_PER_EPOCH} steps, whatever the number of cells")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 500)
        self.epochs.setValue(DEFAULT_EPOCHS)
        self.epochs.setEnabled(False)
        self.auto_epochs.toggled.connect(lambda on: self.epochs.setEnabled(not on))
        self.classifier_combo = ModelCombo("classifier", auto_text=AUTO_CLASSIFIER)
        self.classifier_combo.setToolTip(
            "the classifier that the types you corrected fine-tune (with at least 4 corrected cells). auto: the "
            "one that typed the cells (in Classify, or Segment's 'classify cells'), an adapted one included; when "
            "that is not known, the one trained with the start model, else the shipped one")
        self.device_combo = DeviceCombo()
        self.buttons = RunButtons("Train")
        self.buttons.run.clicked.connect(self.train)
        self.buttons.cancel.clicked.connect(self.cancel)
        self.progress = make_progress()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self._relay = ProgressRelay(self)
        self._relay.progressed.connect(self._on_progress)

        ep = QHBoxLayout()
        ep.addWidget(self.auto_epochs)
        ep.addWidget(self.epochs, 1)
        form = QFormLayout()
        form.addRow("start from", self.model_combo)
        form.addRow("epochs", ep)
        form.addRow("types train", self.classifier_combo)
        form.addRow("device", self.device_combo)
        lay = scroll_layout(self)
        lay.addWidget(QLabel("Corrected labels to learn from"))
        lay.addWidget(self.pairs_table)
        lay.addLayout(form)
        lay.addWidget(self.buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addStretch(1)

        napari_viewer.layers.events.inserted.connect(self._on_layers_changed)
        napari_viewer.layers.events.removed.connect(self._on_layers_changed)
        for layer in napari_viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        self._sync_base_model()
        self.refresh_pairs()
        register(self)

    # ------------------------------------------------------------ pairs
    def _on_layers_changed(self, event=None) -> None:
        if not alive(self):
            return
        value = getattr(event, "value", None)
        if getattr(event, "type", None) == "inserted" and value is not None:
            value.events.name.connect(self._on_layers_changed)
        self.refresh_pairs()

    def _images(self) -> list:
        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Image)]

    def _labels_layers(self) -> list:
        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Labels)]

    def _default_image(self, labels_layer) -> str | None:
        paired = paired_image(self.viewer, labels_layer)  # the image it was segmented from, renamed or not
        if paired is not None:
            return paired.name
        if wbc_meta(labels_layer).get("image_layer") is not None:
            return None  # its image is gone: never guess another one for it
        shape = tuple(np.shape(layer_level0(labels_layer))[-2:])
        same = [lyr.name for lyr in self._images()
                if tuple(layer_level0(lyr).shape[:2]) == shape]  # shapes only: never loads a lazy image
        return same[0] if len(same) == 1 else None  # several of that size (one camera): the user picks

    def refresh_pairs(self) -> None:
        """Rebuild the list of labels layers with their images (keeps your ticks and picks)."""
        table = self.pairs_table
        table.blockSignals(True)
        try:
            labels_layers = self._labels_layers()
            table.setRowCount(len(labels_layers))
            image_names = [lyr.name for lyr in self._images()]
            for r, lab in enumerate(labels_layers):
                key = id(lab)
                if key not in self._auto:  # a segmentation nobody corrected teaches nothing (another of an
                    # image corrected in a second layer contradicts the corrections): not ticked by default
                    self._auto[key] = paired_image(self.viewer, lab) is not None and not is_untouched(lab)
                    if not self._auto[key]:  # corrected later (painted, or a type set): ticked then
                        lab.events.paint.connect(self._on_corrected)
                        lab.events.features.connect(self._on_corrected)
                pick = self._image_pick.get(key)
                if pick not in image_names:
                    pick = self._default_image(lab)
                    if pick is not None:
                        self._image_pick[key] = pick
                use = QTableWidgetItem()
                use.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
                use.setCheckState(Qt.CheckState.Checked if self._ticked(lab) else Qt.CheckState.Unchecked)
                use.setData(Qt.ItemDataRole.UserRole, key)
                table.setItem(r, 0, use)
                name = QTableWidgetItem(lab.name)
                name.setFlags(Qt.ItemFlag.ItemIsEnabled)
                table.setItem(r, 1, name)
                combo = QComboBox()
                combo.addItem(NO_IMAGE)
                combo.addItems(image_names)
                if pick is not None:
                    combo.setCurrentText(pick)
                combo.currentTextChanged.connect(lambda text, key=key: self._on_image_picked(key, text))
                table.setCellWidget(r, 2, combo)
            alive_keys = {id(lyr) for lyr in labels_layers}
            for d in (self._use, self._auto, self._image_pick):
                for k in [k for k in d if k not in alive_keys]:
                    del d[k]
            self._typed_only &= alive_keys
        finally:
            table.blockSignals(False)

    def _ticked(self, labels_layer) -> bool:
        key = id(labels_layer)
        return self._use.get(key, self._auto.get(key, False))

    def _on_corrected(self, event=None) -> None:
        layer = getattr(event, "source", None)
        if not alive(self) or layer is None:
            return
        key = id(layer)
        if event.type == "features" and key in self._typed_only:  # ticked for types set by hand
            if not any_corrected(layer.features):  # every one undone in Classify: untouched again
                self._typed_only.discard(key)
                self._auto[key] = False
                self.refresh_pairs()
            return
        if self._auto.get(key) is not False and key not in self._typed_only:
            return
        if event.type == "features" and not is_painted(layer):
            if any_corrected(layer.features):  # types set by hand on the segmenter's outlines: still
                self._typed_only.add(key)  # followed (an undo in Classify takes them back)
                self._auto[key] = paired_image(self.viewer, layer) is not None
                self.refresh_pairs()
            return  # (else types measured or classified: no correction)
        self._typed_only.discard(key)
        layer.events.paint.disconnect(self._on_corrected)
        layer.events.features.disconnect(self._on_corrected)
        self._auto[id(layer)] = paired_image(self.viewer, layer) is not None
        self.refresh_pairs()

    def _on_item_changed(self, item) -> None:
        if item.column() == 0:
            key = item.data(Qt.ItemDataRole.UserRole)
            self._use[key] = item.checkState() == Qt.CheckState.Checked

    def _on_image_picked(self, key: int, text: str) -> None:
        if text == NO_IMAGE:
            self._image_pick.pop(key, None)
        else:
            self._image_pick[key] = text

    def set_pair(self, labels_layer, image_layer=None, use: bool = True) -> None:
        """Include (or not) ``labels_layer``, paired with ``image_layer`` (by layer or name)."""
        key = id(labels_layer)
        self._use[key] = bool(use)
        if image_layer is not None:
            self._image_pick[key] = getattr(image_layer, "name", image_layer)
        self.refresh_pairs()

    def pairs(self) -> list[tuple]:
        """The included ``(labels_layer, image_layer or None)`` pairs."""
        images = {lyr.name: lyr for lyr in self._images()}
        out = []
        for lab in self._labels_layers():
            if self._ticked(lab):
                out.append((lab, images.get(self._image_pick.get(id(lab)))))
        return out

    # ------------------------------------------------------------ base model
    def _sync_base_model(self) -> None:
        from .segment import SegmentWidget

        for w in find_widgets(self.viewer, SegmentWidget)[-1:]:
            p = w.model_combo.model_path()
            if p is not None:
                try:
                    self.model_combo.add_model(p, select=True)
                except ValueError:
                    pass

    # ------------------------------------------------------------ training
    @property
    def running(self) -> bool:
        return self.worker is not None

    def _collect(self):
        """``(images, labels, names, layers)`` of the included pairs whose labels hold a cell (the others are
        left out, with a notification), or raise ValueError saying what is wrong."""
        pairs = self.pairs()
        if not pairs:
            raise ValueError("tick at least one labels layer to learn from")
        images, labels, names, layers, empty = [], [], [], [], []
        for lab, img in pairs:
            if img is None:
                raise ValueError(f"choose the image that labels {lab.name!r} belong to")
            arr = layer_level0(img)  # a lazy image is loaded by the worker
            data = layer_image(lab)
            if data.ndim != 2:
                raise ValueError(f"labels {lab.name!r} have shape {data.shape}; expected one 2-D plane")
            if data.dtype.kind not in "ui" or (data.dtype.kind == "i" and data.size and data.min() < 0):
                raise ValueError(f"labels {lab.name!r} must hold ids >= 0 (0 = background), "
                                 f"got {data.dtype} from {data.min()}")
            if tuple(arr.shape[:2]) != data.shape:
                raise ValueError(
                    f"labels {lab.name!r} {data.shape} and image {img.name!r} {arr.shape[:2]} differ in size"
                )
            if not data.any():  # a field emptied by hand: not learned from (finetune would leave it out)
                empty.append(lab.name)
                continue
            images.append(arr)
            labels.append(np.array(data, copy=True))
            names.append(lab.name)
            layers.append(lab)
        listed = ", ".join(repr(n) for n in empty)
        if not images:
            raise ValueError(f"labels {listed} hold no cell; include at least one labels layer with cells")
        if empty:
            show_warning(f"Train: labels {listed} hold no cell and are left out (a field without any WBC is "
                         "not learned from)")
        return images, labels, names, layers

    def _corrected_types(self, labels=None, layers=None) -> list[dict] | None:
        """Per included pair (``layers``: the labels layers about to be trained on, in order, else the
        ticked ones) ``{label: type}`` of the cells whose type was corrected by hand and that the labels
        (``labels``: those layers' arrays, else the layers') still hold. Cells typed ``other`` are in it
        (finetune leaves them out of the classifier's examples).

        None when fewer than 4 corrected cells of the classifier's types exist in all (too few to learn
        types from).
        """
        out = []
        for k, lab in enumerate(layers if layers is not None else [lab for lab, _ in self.pairs()]):
            types = corrected_types(lab.features)
            if types:  # only then is the whole layer looked at (it was, with np.unique: 3.5 s on 225 Mpx)
                data = labels[k] if labels is not None else layer_image(lab)
                present = present_ids(data, list(types))
                types = {i: t for i, t in types.items() if i in present}
            out.append(types)
        return out if sum(t != OTHER for types in out for t in types.values()) >= 4 else None

    def train(self):
        """Start fine-tuning on the included pairs; returns the worker (None when nothing started)."""
        if self.running:
            return None
        try:
            images, labels, names, layers = self._collect()
        except ValueError as e:
            show_error(error_message("Train", e))
            return None
        base = self.model_combo.model_path()
        if base is None:
            show_error("Train: no model to start from (the shipped model is missing); choose one with 'Browse...'")
            return None
        epochs = None if self.auto_epochs.isChecked() else int(self.epochs.value())
        cell_types = self._corrected_types(labels, layers)
        types_note = None
        if cell_types is not None:
            from napari_wbc.core.classifier_finetune import check_cell_types
            from napari_wbc.core.classify import CLASSES

            try:  # too few to check a new classifier on: the outlines are still learned
                check_cell_types(cell_types, {"classes": list(CLASSES)})
            except ValueError as e:
                types_note, cell_types = f"the corrected types were not learned: {e}", None
        classifier, cls_note = (self._types_classifier(layers, cell_types, base) if cell_types is not None
                                else (None, None))
        self._stop = stop = threading.Event()
        n_other = sum(t == OTHER for types in cell_types or [] for t in types.values())
        other_note = (f"{n_other} cell{'s' if n_other != 1 else ''} typed {OTHER} trained the outlines only, "
                      "not the classifier" if n_other else None)
        self._job = {"base": Path(base), "names": names, "types": cell_types is not None, "types_note": types_note,
                     "other_note": other_note, "classifier": cls_note}
        self.buttons.set_busy(True)
        self.progress.setRange(0, 0)
        self.progress.setFormat("scoring the starting model...")
        self.status.setText(f"training on {', '.join(names)}"
                            + (f" (and the classifier {cls_note} on the corrected types" if cell_types else "")
                            + (f"; {other_note})" if other_note else ")" if cell_types else "") + "...")
        relay = self._relay
        self.destroyed.connect(stop.set)  # the viewer's window closed: stop at the next batch, writing nothing

        def progress(epoch, total, metrics):
            try:
                relay.progressed.emit(int(epoch), int(total), dict(metrics))
            except RuntimeError:  # the widget was closed: stop, writing nothing
                stop.set()

        self.worker = start_worker(
            _finetune_job,
            images,
            labels,
            base=base,
            epochs=epochs,
            device=self.device_combo.device(),
            progress=progress,
            should_stop=stop.is_set,
            cell_types=cell_types,
            classifier=classifier,
            on_return=self._on_return,
            on_error=self._on_error,
            on_finish=self._on_finish,
            owner=self,
            on_warning=_show_work_warning,
        )
        return self.worker

    def _types_classifier(self, layers, cell_types, base) -> tuple[Path | None, str]:
        """The classifier the corrected types fine-tune (None: the one paired with ``base``, else the
        shipped one, as :func:`~napari_wbc.core.finetune.finetune` picks) and its name for the messages.
        auto: the classifier that typed the layers holding corrected types, when they all name one file."""
        from napari_wbc.core.finetune import typing_classifier

        from .classify import typed_by

        chosen = None if self.classifier_combo.is_auto() else self.classifier_combo.model_path()
        if chosen is not None:
            return chosen, repr(chosen.stem)
        classifier, path, why = typing_classifier([typed_by(lab) for lab, types in zip(layers, cell_types) if types],
                                                  base)
        return classifier, f"{path.stem!r} ({why})"

    def cancel(self) -> None:
        """Ask training to stop; nothing is written and the previous model stays."""
        if self.worker is not None:
            self._stop.set()
            self.status.setText("cancelling...")

    def _on_progress(self, epoch: int, total: int, metrics: dict) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(epoch)
        if metrics.get("stage") == "classifier":  # after the outlines: the classifier's own epochs
            text = f"classifier: epoch {epoch}/{total} · held-out accuracy {_score_text(metrics.get('holdout_accuracy'))}"
            if metrics.get("before_accuracy") is not None:
                text += f" (before {_score_text(metrics['before_accuracy'])})"
            self.progress.setFormat(text)
            return
        loss = metrics.get("loss")
        text = f"epoch {epoch}/{total}"
        if loss is not None:
            text += f" · loss {loss:.3f}"
        text += f" · val Dice {_score_text(metrics.get('matched_dice'))}"
        if metrics.get("before_dice") is not None:
            text += f" (before {_score_text(metrics['before_dice'])})"
        n = _held_out_cells(metrics)
        if n is not None:  # how much the figure rests on: one held-out cell the model missed reads 0.000
            text += f" on {n} held-out cell{'s' if n != 1 else ''}"
        self.progress.setFormat(text)

    def _on_return(self, path) -> None:
        path = Path(path)
        base = self._job["base"]
        if path.resolve() == base.resolve():
            msg = f"Train: no improvement on the held-out cells; the base model {base.name!r} is kept"
            if self._job.get("types_note"):
                msg += f"; {self._job['types_note']}"
            self.status.setText(msg)
            show_warning(msg)
            return
        from napari_wbc.core.models import read_card

        try:
            ft = read_card(path).get("finetune", {}) or {}
        except ValueError:
            ft = {}
        before = (ft.get("holdout_before") or {}).get("matched_dice")
        after = (ft.get("holdout_after") or {}).get("matched_dice")
        if ft.get("kept_base_weights"):
            dice = (f"cell types trained; outlines kept from {base.name}, no epoch beat its validation Dice "
                    f"{_score_text(before)}")
        elif before is None and after is None:
            dice = "no held-out cells to validate on"
        else:
            dice = f"validation Dice {_score_text(before)} -> {_score_text(after)}"
        n = _held_out_cells(ft.get("holdout_before") or {})
        if n is not None and before is not None:
            dice += f" on {n} held-out cell{'s' if n != 1 else ''}" + (": too few to tell" if n < 3 else "")
        msg = f"Train: new model {path.name} ({dice})"
        from napari_wbc.core.finetune import trained_classifier, types_outcome

        cls_path = trained_classifier(path)
        if self._job.get("types_note"):
            msg += f"; {self._job['types_note']}"
        elif self._job.get("types"):
            msg += "; " + types_outcome(cls_path, None if cls_path is None else cls_path.name)
            if self._job.get("other_note"):
                msg += f" ({self._job['other_note']})"
        self.status.setText(msg)
        self.model_combo.add_model(path, select=False)
        from .segment import SegmentWidget

        for w in find_widgets(self.viewer, SegmentWidget):
            try:
                w.add_model(path, select=True)
            except ValueError as e:
                show_error(error_message("Train: could not add the new model to Segment", e))
        if cls_path is not None:
            self.classifier_combo.add_model(cls_path, select=False)
            from .classify import ClassifyWidget

            for w in find_widgets(self.viewer, ClassifyWidget):
                try:
                    w.model_combo.add_model(cls_path, select=True)
                except ValueError as e:
                    show_error(error_message("Train: could not add the new classifier to Classify", e))
        show_info(msg)

    def _on_error(self, exc) -> None:
        from napari_wbc.core.finetune import FinetuneCancelled

        if isinstance(exc, FinetuneCancelled):
            self.status.setText("cancelled, previous model kept")
            show_info("Train: cancelled, previous model kept")
            return
        self.status.setText("failed")
        show_error(error_message("Train failed", exc))

    def _on_finish(self) -> None:
        self.worker = None
        self.buttons.set_busy(False)
        reset_progress(self.progress)


def _finetune_job(images, labels, **kwargs) -> Path:
    """Run by the worker (a plain function: finetune reports through its callback)."""
    from napari_wbc.core.finetune import finetune

    return finetune([np.asarray(a) for a in images], labels, **kwargs)  # lazy images computed here


def _show_work_warning(w) -> None:
    """A warning of napari-wbc's training ((message, category, file, line...)), except the
    base-model-kept outcome, which the widget reports itself when the work returns (it was shown
    twice). Others are not the training's: while a worker runs, every thread's warnings reach it
    (napari's own about a layer being edited meanwhile came as "Train: ...")."""
    from napari_wbc.core.finetune import BaseKeptWarning

    ours = len(w) > 2 and f"napari_wbc{os.sep}" in str(w[2])
    if ours and not (isinstance(w[1], type) and issubclass(w[1], BaseKeptWarning)):
        show_warning(f"Train: {w[0]}")
