"""Pieces shared by the napari-wbc dock widgets (thin Qt glue, no pixel arithmetic).

- :class:`LayerCombo`: a layer picker that follows the viewer's layer list;
- :class:`ModelCombo`: shipped model + the user's fine-tuned models + "Browse...";
- :class:`DeviceCombo`: ``auto`` + the devices torch can use here (listed in the
  background, with the widget's model preload: :func:`warm_up`);
- :func:`start_worker`: run a core generator/function in a napari thread worker
  with our own error reporting;
- a weak registry so one widget can find another of the same viewer
  (the Train widget hands its new model to the Segment widget).
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
from qtpy.QtCore import QEvent, QObject, QSize, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

class _VerticalScroll(QScrollArea):
    """Scrolls up and down only; as wide as its contents need, as tall as they like when there is room."""

    def sizeHint(self):
        return self.widget().sizeHint()

    def minimumSizeHint(self):
        hint = self.widget().minimumSizeHint()
        return QSize(hint.width() + self.verticalScrollBar().sizeHint().width(), min(hint.height(), 240))


def scroll_layout(widget: QWidget) -> QVBoxLayout:
    """The layout to fill ``widget`` with, inside a scroll area: a dock can then be shorter than its
    contents (three napari-wbc docks stacked needed 1243 px on a 1000 px screen, hiding Train's status)."""
    inner = QWidget()
    lay = QVBoxLayout(inner)
    area = _VerticalScroll()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(inner)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    return lay


BROWSE = "Browse..."
_BROWSE_DATA = "<browse>"
_AUTO_DATA = "<auto>"
META_KEY = "napari_wbc"

# ----------------------------------------------------------------- registry
_REGISTRY: "weakref.WeakValueDictionary[int, QWidget]" = weakref.WeakValueDictionary()
_ORDER = itertools.count()


def register(widget: QWidget) -> None:
    """Make ``widget`` findable by :func:`find_widgets` (held weakly, in creation order)."""
    _REGISTRY[next(_ORDER)] = widget


def alive(widget) -> bool:
    """Whether the Qt object behind ``widget`` still exists."""
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True


def find_widgets(viewer, cls) -> list:
    """Open widgets of type ``cls`` in ``viewer`` (most recently created last); one whose dock was
    closed is not open (napari keeps the object)."""
    return [w for _, w in sorted(_REGISTRY.items(), key=lambda kv: kv[0])
            if isinstance(w, cls) and getattr(w, "viewer", None) is viewer and alive(w) and not getattr(w, "closed", False)]


# ----------------------------------------------------------------- helpers
def unwrap_viewer(viewer):
    """The viewer itself: npe2 hands widgets a public-only proxy, whose ``viewer.layers[name]``
    and ``add_*`` return new proxy objects each time; layer identity matters to our pickers."""
    return getattr(viewer, "__wrapped__", viewer)


def wbc_meta(layer) -> dict:
    """The napari-wbc part of a layer's metadata (empty dict when none)."""
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get(META_KEY)
    return value if isinstance(value, dict) else {}


def data_hash(data) -> str:
    """A digest of a label array, to tell whether the user changed it."""
    from napari_wbc.core.io import array_digest

    return array_digest([data])


def layer_level0(layer):
    """The full-resolution data of an image or labels layer (level 0 of a multiscale), as the layer
    holds it: a lazy (dask, zarr) array stays lazy, for a worker to load off the GUI thread."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


def layer_image(layer) -> np.ndarray:
    """:func:`layer_level0` as a numpy array (loads a lazy array: not on the GUI thread for large ones)."""
    return np.asarray(layer_level0(layer))


def plane_transform(layer) -> dict:
    """Keyword arguments that place a 2-D layer (labels, points) exactly over ``layer``'s plane in
    world coordinates: scale and translate, and for a 2-D layer also rotate, shear, affine and units
    (a labels layer with only scale and translate would sit elsewhere on a rotated image)."""
    kw = {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:])}
    if layer.ndim == 2:
        kw.update(rotate=np.asarray(layer.rotate), shear=np.asarray(layer.shear),
                  affine=np.asarray(layer.affine.affine_matrix))
        units = getattr(layer, "units", None)
        if units is not None:
            kw["units"] = units
    return kw


def layer_id(layer) -> str | None:
    """napari's id of a layer (kept through renames), as a string for metadata."""
    uid = getattr(layer, "unique_id", None)
    return None if uid is None else str(uid)


def paired_image(viewer, labels_layer):
    """The image layer a napari-wbc labels layer was made from: by that layer's id (follows a rename),
    else by its name (an image opened again); None when neither is in the viewer or none is known."""
    from napari.layers import Image

    meta = wbc_meta(labels_layer)
    images = [lyr for lyr in viewer.layers if isinstance(lyr, Image)]
    uid = meta.get("image_layer_id")
    if uid is not None:
        for lyr in images:
            if layer_id(lyr) == uid:
                return lyr
    name = meta.get("image_layer")
    return next((lyr for lyr in images if name is not None and lyr.name == name), None)


def error_message(what: str, exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    return f"{what}: {msg}"


# ----------------------------------------------------------------- pickers
class LayerCombo(QComboBox):
    """Picks a layer of ``layer_type``; refreshes on insert/remove/rename.

    With ``follow_new`` a newly inserted layer of the type becomes the choice.
    """

    layer_changed = Signal(object)

    def __init__(self, viewer, layer_type, *, follow_new: bool = False, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self.follow_new = follow_new
        self._current = None
        self.currentIndexChanged.connect(self._on_index)
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removed.connect(self._on_removed)
        for layer in viewer.layers:
            layer.events.name.connect(self._on_renamed)
        # to start with: the selected layer when it is of the type, else the newest (not the first)
        active = viewer.layers.selection.active
        mine = self.layers()
        self.refresh(prefer=active if isinstance(active, layer_type) else (mine[-1] if mine else None))

    def layers(self) -> list:
        return [lyr for lyr in self.viewer.layers if isinstance(lyr, self.layer_type)]

    def layer(self):
        """The chosen layer, or None."""
        i = self.currentIndex()
        return self.itemData(i) if i >= 0 else None

    def set_layer(self, layer) -> bool:
        for i in range(self.count()):
            if self.itemData(i) is layer:
                self.setCurrentIndex(i)
                return True
        return False

    def refresh(self, prefer=None) -> None:
        keep = prefer if prefer is not None else self.layer()
        self.blockSignals(True)
        try:
            self.clear()
            for lyr in self.layers():
                self.addItem(lyr.name, lyr)
            if keep is not None:
                self.set_layer(keep)
        finally:
            self.blockSignals(False)
        self._on_index(self.currentIndex())

    def _on_index(self, _i) -> None:
        layer = self.layer()
        if layer is not self._current:
            self._current = layer
            self.layer_changed.emit(layer)

    def _on_inserted(self, event) -> None:
        if not alive(self):
            return
        layer = event.value
        layer.events.name.connect(self._on_renamed)
        follow = self.follow_new and isinstance(layer, self.layer_type)
        self.refresh(prefer=layer if follow else None)

    def _on_removed(self, event) -> None:
        if alive(self):
            self.refresh()

    def _on_renamed(self, event=None) -> None:
        if not alive(self):
            return
        for i in range(self.count()):
            lyr = self.itemData(i)
            if lyr is not None and self.itemText(i) != lyr.name:
                self.setItemText(i, lyr.name)


PRELOAD_ENV = "NAPARI_WBC_PRELOAD"


def preload_enabled() -> bool:
    """Whether widgets load their model in the background when they open (``NAPARI_WBC_PRELOAD=0``: no)."""
    return os.environ.get(PRELOAD_ENV, "").strip() != "0"


def warm_up(kind: str, model, device: str) -> None:
    """Load ``model`` (a ``kind`` model file) on ``device``, and for a segmenter run it once on a tiny
    blank image, so that the libraries, the weights and the kernels are ready when the user first runs it."""
    if kind == "segmenter":  # segment() loads the model (into the shared cache) on its way
        from napari_wbc.core.segment import segment

        segment(np.full((64, 64, 3), 255, np.uint8), model=model, device=device, diameter=32.0)
    else:
        import napari_wbc.core.classify  # noqa: F401
        from napari_wbc.core.models import load_model

        load_model(model, kind, device)


def model_preload(models: "ModelCombo") -> Callable[[str], None] | None:
    """What a widget's :class:`DeviceCombo` runs after listing the devices: :func:`warm_up` of the
    model chosen in ``models`` (None when there is none, or with ``NAPARI_WBC_PRELOAD=0``)."""
    model = models.model_path()
    if model is None or not preload_enabled():
        return None
    return functools.partial(warm_up, models.kind, model)


def _torch_loaded() -> bool:
    """torch fully imported (not merely being imported by another thread, which would make us wait)."""
    module = sys.modules.get("torch")
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _list_devices() -> list[str]:
    from napari_wbc.core import device

    return device.available_devices()


class DeviceCombo(QComboBox):
    """``auto`` (cuda, then mps, then cpu) and every device available here.

    Listing the devices imports torch, which takes seconds the first time; then it
    runs in a background thread, the combo shows ``auto`` and ``cpu`` at once and
    gains the accelerators when they are known, so opening a widget never waits.
    ``then(device)`` (optional) runs in that thread afterwards with the device
    ``auto`` stands for: a widget's model preload.
    """

    _found = Signal(object)

    def __init__(self, parent=None, *, then: Callable[[str], None] | None = None):
        super().__init__(parent)
        self.addItem("auto")
        self.addItem("cpu")
        self.setToolTip("auto = cuda, then mps, then cpu")
        self._listed = threading.Event()
        self._found.connect(self._add_devices)
        self._thread = None
        if _torch_loaded():  # cheap once torch is loaded
            self._add_devices(_list_devices())
            if then is None:
                return
        self._thread = threading.Thread(target=self._background, args=(then,), daemon=True, name="napari-wbc devices")
        self._thread.start()

    def _background(self, then) -> None:
        hide_triton()  # before this thread imports torch
        try:
            names = _list_devices()
        except Exception:  # noqa: BLE001 - a broken torch install shows up when a run starts
            names = ["cpu"]
        try:
            self._found.emit(names)  # delivered in the GUI thread
        except RuntimeError:  # the widget was closed meanwhile
            return
        finally:
            self._listed.set()
        if then is not None:
            try:
                then(names[0])
            except Exception as e:  # noqa: BLE001 - a broken model file is reported when it is used
                logging.getLogger(__name__).debug("preload failed: %s", e)

    def _add_devices(self, names) -> None:
        for name in names:
            if self.findText(name) < 0:
                self.insertItem(self.count() - 1, name)  # accelerators before cpu
        self._listed.set()

    def device(self) -> str:
        return self.currentText()

    def set_device(self, name: str) -> None:
        if self.findText(name) < 0 and self._thread is not None:  # maybe not listed yet
            self._listed.wait(120)
            self._add_devices(_list_devices())  # now cheap; the queued listing may not have arrived yet
        i = self.findText(name)
        if i < 0:
            raise ValueError(f"device {name!r} is not available here")
        self.setCurrentIndex(i)


def _user_models(kind: str) -> list[Path]:
    from napari_wbc.core import finetune

    try:
        return finetune.list_user_models(kind)
    except OSError:
        return []


class ProgressRelay(QObject):
    """Carries a worker's progress callback ``(done, total, info)`` to the GUI thread."""

    progressed = Signal(int, int, object)


class ModelCombo(QComboBox):
    """Model files of ``kind``: the shipped one (when present), the user's, then "Browse..."."""

    model_changed = Signal(object)

    def __init__(self, kind: str = "segmenter", parent=None, *, auto_text: str | None = None):
        super().__init__(parent)
        self.kind = kind
        self.auto_text = auto_text  # a first item meaning "chosen for you" (model_path() None), if given
        self._last = -1
        self.activated.connect(self._on_activated)  # user interaction only
        self.currentIndexChanged.connect(self._on_index)
        self.reload()

    # item data: the model path as a string, _BROWSE_DATA for "Browse...", _AUTO_DATA for the auto item
    def _path_at(self, i: int) -> str | None:
        d = self.itemData(i) if 0 <= i < self.count() else None
        return d if d and d not in (_BROWSE_DATA, _AUTO_DATA) else None

    def _choice_at(self, i: int) -> bool:
        """Item ``i`` is a choice (a model, or the auto item), not "Browse..."."""
        return self._path_at(i) is not None or (0 <= i < self.count() and self.itemData(i) == _AUTO_DATA)

    def is_auto(self) -> bool:
        """The auto item is chosen."""
        return self.currentIndex() >= 0 and self.itemData(self.currentIndex()) == _AUTO_DATA

    def select_auto(self) -> None:
        i = self.findData(_AUTO_DATA)
        if i >= 0:
            self.setCurrentIndex(i)

    def reload(self) -> None:
        from napari_wbc.core.models import shipped_models

        keep = self.model_path()
        extra = [self._path_at(i) for i in range(self.count()) if self._path_at(i)]
        self.blockSignals(True)
        try:
            self.clear()
            if self.auto_text:
                self.addItem(self.auto_text, _AUTO_DATA)
            for p in shipped_models(self.kind):  # the default first
                self._add(p, f"shipped: {p.stem}")
            for p in _user_models(self.kind):
                self._add(p, f"yours: {p.stem}")
            for p in extra:  # added by hand earlier (browsed, trained)
                if Path(p).exists():
                    self._add(Path(p), f"file: {Path(p).stem}")
            self.addItem(BROWSE, _BROWSE_DATA)
            if keep is not None:
                self._select(keep)
        finally:
            self.blockSignals(False)
        self._last = self.currentIndex()

    def _index_of(self, path) -> int:
        target = Path(path).expanduser().resolve()
        for i in range(self.count()):
            d = self._path_at(i)
            if d is not None and Path(d).resolve() == target:
                return i
        return -1

    def _add(self, path: Path, text: str, index: int | None = None) -> int:
        if self._index_of(path) >= 0:
            return self._index_of(path)
        if index is None:
            browse = self.findData(_BROWSE_DATA)
            index = browse if browse >= 0 else self.count()
        self.insertItem(index, text, str(path))
        self.setItemData(index, str(path), Qt.ItemDataRole.ToolTipRole)
        return index

    def _select(self, path) -> bool:
        i = self._index_of(path)
        if i >= 0:
            self.setCurrentIndex(i)
        return i >= 0

    def model_path(self) -> Path | None:
        """The chosen model file, or None when there is none to choose."""
        d = self._path_at(self.currentIndex())
        return Path(d) if d else None

    def add_model(self, path, *, select: bool = True) -> Path:
        """Add a model file (checked: a ``.safetensors`` of this kind with its card) and select it."""
        from napari_wbc.core.models import read_card, resolve_model_path

        p = resolve_model_path(path, self.kind)
        card = read_card(p)
        if card.get("kind") != self.kind:
            raise ValueError(f"model file {str(p)!r} is a {card.get('kind')}, expected a {self.kind}")
        user = {q.resolve() for q in _user_models(self.kind)}
        label = f"yours: {p.stem}" if p.resolve() in user else f"file: {p.stem}"
        from napari_wbc.core.models import SHIPPED

        shipped = SHIPPED.get(self.kind)
        first = 1 if self.auto_text else 0  # after the auto item and the shipped model
        first += 1 if shipped is not None and self._index_of(shipped) == first else 0
        i = self._index_of(p)
        if i < 0:
            self.blockSignals(True)
            try:
                i = self._add(p, label, index=first)
            finally:
                self.blockSignals(False)
        if select:
            self.setCurrentIndex(i)
        return p

    def _on_index(self, i) -> None:
        if self._choice_at(i):
            self._last = i
            self.model_changed.emit(self.model_path())

    def _on_activated(self, i) -> None:
        if self.itemData(i) == _BROWSE_DATA:
            self.browse()

    def browse(self) -> None:
        from napari.utils.notifications import show_error

        path, _ = QFileDialog.getOpenFileName(
            self, f"Choose a {self.kind} model", str(Path.home()), "Model files (*.safetensors)"
        )
        if path:
            try:
                self.add_model(path, select=True)
                return
            except ValueError as e:
                show_error(error_message("Cannot use this model", e))
        if self._choice_at(self._last):
            self.setCurrentIndex(self._last)
        else:
            self.setCurrentIndex(-1)


# ----------------------------------------------------------------- running
class CancelWhenRemoved:
    """Mixin for a dock widget with ``running`` and ``cancel()``: its work is cancelled when the
    widget is taken out of napari's window (the dock's close button, ``remove_dock_widget``: napari
    un-parents the widget rather than deleting it), so a closed widget writes nothing, adds no layer
    and does not run on unseen. A docked widget taken out is ``closed`` (:func:`find_widgets` skips
    it) and :meth:`on_closed` lets go of what it follows; docked again, :meth:`on_reopened`."""

    closed = False
    _docked = False

    def event(self, e):  # noqa: D102 - Qt's
        if e.type() == QEvent.Type.ParentChange:
            if self.parent() is None:
                if self.running:
                    self.cancel()
                if self._docked and not self.closed:
                    self.closed = True
                    self.on_closed()
            else:
                self._docked = True
                if self.closed:
                    self.closed = False
                    self.on_reopened()
        return super().event(e)

    def on_closed(self) -> None:
        """The dock was closed: stop following layers (a closed widget must not react to edits)."""

    def on_reopened(self) -> None:
        """Docked again after :meth:`on_closed`."""


class RunButtons(QWidget):
    """A run button and a Cancel button; run is disabled while busy."""

    def __init__(self, text: str, parent=None):
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.run = QPushButton(text)
        self.cancel = QPushButton("Cancel")
        self.cancel.setEnabled(False)
        lay.addWidget(self.run)
        lay.addWidget(self.cancel)

    def set_busy(self, busy: bool) -> None:
        self.run.setEnabled(not busy)
        self.cancel.setEnabled(busy)


def reset_progress(progress) -> None:
    """An idle, empty progress bar (after a job ends, however it ended)."""
    progress.setRange(0, 1)
    progress.setValue(0)
    progress.setFormat("")


def make_progress() -> QProgressBar:
    bar = QProgressBar()
    bar.setRange(0, 1)
    bar.setValue(0)
    bar.setTextVisible(True)
    bar.setFormat("")
    return bar


class WorkError(Exception):
    """An error raised inside a generator worker (re-raised so the worker reports it)."""


def _guarded(gen_func, *args, **kwargs):
    # superqt's GeneratorWorker treats a RuntimeError from the generator as "the worker was
    # deleted" and only warns: torch errors (out of memory...) are RuntimeErrors, so re-raise.
    try:
        return (yield from gen_func(*args, **kwargs))
    except RuntimeError as e:
        raise WorkError(str(e) or type(e).__name__) from e


def hide_triton() -> None:
    """Mark triton absent before torch (imported later, in any thread) looks for it.

    timm (through smp) makes torch import triton, whose bundled LLVM crashes
    the process when Mesa's llvmpipe OpenGL (also LLVM) is already loaded, as
    in napari on VMs, remote desktops and Xvfb (seen: segfault in
    ``triton/knobs.py``, also from the widgets' background preload).
    napari-wbc never uses triton (no ``torch.compile``), so in the GUI it is
    marked absent; set ``NAPARI_WBC_ALLOW_TRITON=1`` to keep it (``0`` or empty: hidden, as for
    the other ``NAPARI_WBC_*`` switches).
    """
    if "triton" not in sys.modules and os.environ.get("NAPARI_WBC_ALLOW_TRITON", "") in ("", "0"):
        sys.modules["triton"] = None  # import triton -> ImportError: torch treats it as missing


def start_worker(
    func: Callable,
    *args,
    on_yield: Callable | None = None,
    on_return: Callable | None = None,
    on_error: Callable | None = None,
    on_finish: Callable | None = None,
    on_abort: Callable | None = None,
    on_warning: Callable | None = None,
    owner: QWidget | None = None,
    **kwargs,
):
    """Start ``func(*args, **kwargs)`` (a generator function or a plain one) in a thread worker.

    With ``owner`` (the widget the results are for), the handlers are not called once that widget
    is deleted (its viewer's window closed while the work ran), and a generator's work stops at its
    next step then.

    The worker classes are used directly: napari's ``create_worker`` connects a
    status-bar slot to ``errored`` that takes the wrong number of arguments
    under PySide6, so an error in the work would become a second error.
    """
    import inspect

    from napari.qt.threading import GeneratorWorker

    hide_triton()  # the work imports torch in its thread (seconds the first time): never on the GUI thread

    generator_cls, function_cls = _quit_safe_workers()
    if inspect.isgeneratorfunction(func):
        worker = generator_cls(_guarded, func, *args, **kwargs)
    else:
        worker = function_cls(func, *args, **kwargs)
    for signal, slot in (
        ("yielded", on_yield),
        ("returned", on_return),
        ("errored", on_error),
        ("finished", on_finish),
        ("aborted", on_abort),
        ("warned", on_warning),  # warnings.warn in the work: the showwarning arguments (message first)
    ):
        if slot is not None and hasattr(worker, signal):
            getattr(worker, signal).connect(slot if owner is None else _while_alive(owner, slot))
    if owner is not None and isinstance(worker, GeneratorWorker):
        owner.destroyed.connect(worker.quit)
    worker.start()
    return worker


@functools.lru_cache(maxsize=None)
def _quit_safe_workers():
    """napari's generator and function workers, except that work ending after napari has quit (its
    window closed during a brush stroke's measuring, or Segment's last stage) ends quietly: reporting
    to the deleted signals object raised in the pool thread, and Qt aborted the process (exit 134)."""
    from napari.qt.threading import FunctionWorker, GeneratorWorker

    def run_quietly(worker, run):
        try:
            run()
        except RuntimeError:
            if alive(worker.signals):
                raise
            # the signals object is gone with the app: nobody is left to report to

    class QuitSafeGeneratorWorker(GeneratorWorker):
        def run(self):
            run_quietly(self, super().run)

    class QuitSafeFunctionWorker(FunctionWorker):
        def run(self):
            run_quietly(self, super().run)

    return QuitSafeGeneratorWorker, QuitSafeFunctionWorker


def _while_alive(owner: QWidget, slot: Callable) -> Callable:
    """``slot``, called only while the Qt object behind ``owner`` exists."""
    ref = weakref.ref(owner)

    def call(*args):
        widget = ref()
        if widget is not None and alive(widget):
            slot(*args)

    return call
