"""Classify WBCs dock widget: cell types, differential count, corrections, CSV export.

The per-cell table lives in the labels layer's ``features`` (an ``index`` column
holds the label id); the types are drawn by a Points layer ``<labels> types``
at the cell centroids. The network work is
:func:`napari_wbc.core.classify.iter_classify`, run in a thread worker.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Points
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_wbc.core.classify import CELL_TYPES, CLASSES, OTHER, percentages
from napari_wbc.core.segment import cell_features, merge_measured, remeasure

from ._common import (
    ProgressRelay,
    scroll_layout,
    CancelWhenRemoved,
    META_KEY,
    DeviceCombo,
    LayerCombo,
    ModelCombo,
    RunButtons,
    alive,
    data_hash,
    error_message,
    find_widgets,
    layer_id,
    layer_image,
    layer_level0,
    make_progress,
    model_preload,
    paired_image,
    plane_transform,
    register,
    reset_progress,
    start_worker,
    unwrap_viewer,
    wbc_meta,
)

UNDO_STEPS = 500  # type changes Undo can take back (all layers together)
DIFFERENTIAL_CELLS = 100  # a manual differential is read over 100 typed WBCs (the slide count says how many more)
SCOPES = ("this labels layer", "the slide: all segmented layers")

CLASS_COLORS = {
    "neutrophil": "#4c9be8",
    "lymphocyte": "#f5c242",
    "monocyte": "#4cc46a",
    "eosinophil": "#e8524c",
    "basophil": "#a65ce8",
}
OTHER_COLOR = "#b0b0b0"  # the type "other" (set by hand), and any type of a classifier's own
TYPES_SUFFIX = "types"


def class_names() -> list[str]:
    """The types the classifier predicts (not ``other``, which only a user sets)."""
    return list(CLASSES)


# ------------------------------------------------------------------ the per-cell table (pandas only)
def is_classified(features) -> bool:
    return features is not None and "cell_type" in features and bool(pd.notna(features["cell_type"]).any())


def _with_type_columns(features: pd.DataFrame, table_columns) -> pd.DataFrame:
    f = features.copy()
    for c in table_columns:
        if c == "label" or c in f:
            continue
        f[c] = pd.Series([None] * len(f), dtype=object, index=f.index) if c == "cell_type" else np.nan
    if "corrected" not in f:
        f["corrected"] = False
    f["corrected"] = f["corrected"].fillna(False).astype(bool)
    return f


def merge_classification(features: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Put ``table``'s types into ``features`` for its labels; corrected rows are kept as they are.

    Labels of ``table`` missing from ``features`` (cells erased meanwhile) are ignored.
    """
    f = _with_type_columns(features, table.columns).reset_index(drop=True)
    t = table.drop_duplicates("label").set_index("label")
    rows = f["label"].isin(t.index).to_numpy() & ~f["corrected"].to_numpy()
    ids = f.loc[rows, "label"].to_numpy()
    for c in t.columns:
        values = t.loc[ids, c].to_numpy()
        if c == "cell_type":
            col = f[c].astype(object)
            col[rows] = values
            f[c] = col
        else:
            f.loc[rows, c] = values
    return f


def with_totals(counts: pd.DataFrame) -> pd.DataFrame:
    """``counts`` (:func:`differential_count`) with a ``total`` row of every cell; the percents are of
    the typed WBCs, so with ``other`` or unclassified cells a ``total typed`` row (neither) holds the
    100 % and ``total`` none."""
    aside = counts["cell_type"].isin([OTHER, "unclassified"]).to_numpy()
    typed = int(counts.loc[~aside, "count"].sum())
    apart = bool((counts.loc[aside, "count"] > 0).any())
    rows = [{"cell_type": "total", "count": int(counts["count"].sum()), "percent": np.nan if apart else 100.0}]
    if apart:
        rows.insert(0, {"cell_type": "total typed", "count": typed, "percent": 100.0 if typed else np.nan})
    return pd.concat([counts, pd.DataFrame(rows)], ignore_index=True)


def differential_count(features) -> pd.DataFrame:
    """Rows ``cell_type, count, percent`` for every class (+ a classifier's own types), then ``other``
    (typed so by hand) and ``unclassified`` (when there are any). The percents are of the typed WBCs:
    ``other`` and unclassified cells have none and are not in the others'."""
    classes = class_names()
    if features is None or len(features) == 0 or "cell_type" not in features:
        types = pd.Series([], dtype=object)
        n_unclassified = 0 if features is None else len(features)
    else:
        col = features["cell_type"]
        types = col[pd.notna(col)].astype(str)
        n_unclassified = int(pd.isna(col).sum())
    found = types.value_counts()
    order = classes + sorted(t for t in found.index if t not in classes and t != OTHER)
    counts = {c: int(found.get(c, 0)) for c in [*order, OTHER]}
    pct = percentages(counts)  # of the typed WBCs; none typed: no percent (as the CLI)
    rows = [{"cell_type": c, "count": k, "percent": np.nan if pct[c] is None else pct[c]} for c, k in counts.items()]
    if n_unclassified:
        rows.append({"cell_type": "unclassified", "count": n_unclassified, "percent": np.nan})
    return pd.DataFrame(rows, columns=["cell_type", "count", "percent"])


def in_slide(layer) -> bool:
    """Whether a layer is a field of the slide count: a labels layer that napari-wbc segmented or saved
    (its metadata says so) or whose table has cell types (a ground-truth mask opened beside a smear is
    neither)."""
    if not isinstance(layer, Labels):
        return False
    feats = layer.features
    return bool(wbc_meta(layer)) or (feats is not None and "cell_type" in feats)


def slide_fields(viewer, prefer=None) -> tuple[list, int]:
    """The labels layers of the slide count (:func:`in_slide`), one per smear: where several were made
    from one smear (segmented again after an edit), ``prefer`` when it is one of them, else the newest.
    Returns ``(layers, how many other layers of the same smears were left out)``."""
    groups: dict = {}
    for lyr in viewer.layers:
        if not in_slide(lyr):
            continue
        image = paired_image(viewer, lyr)
        name = wbc_meta(lyr).get("image_layer")
        key = ("image", id(image)) if image is not None else ("name", name) if name else ("own", id(lyr))
        groups.setdefault(key, []).append(lyr)
    kept = [next((lyr for lyr in group if lyr is prefer), group[-1]) for group in groups.values()]
    return kept, sum(len(group) for group in groups.values()) - len(kept)


def field_name(viewer, labels_layer) -> str:
    """The name of the smear a labels layer was made from (its layer in the viewer, else the name it
    had), else the labels layer's own name."""
    image = paired_image(viewer, labels_layer)
    if image is not None:
        return image.name
    return str(wbc_meta(labels_layer).get("image_layer") or labels_layer.name)


def least_confident(features) -> tuple | None:
    """``(confidence, label)`` of the least confident classified cell not yet corrected or confirmed in a
    per-cell table (ties: the lowest label); None when there is none."""
    f = features
    if f is None or not is_classified(f) or "confidence" not in f:
        return None
    todo = pd.notna(f["cell_type"]) & pd.notna(f["confidence"])
    if "corrected" in f:
        todo &= ~f["corrected"].fillna(False).astype(bool)
    if not todo.any():
        return None
    row = f.loc[todo].sort_values(["confidence", "label"], kind="stable").iloc[0]
    return float(row["confidence"]), int(row["label"])


def show_field(viewer, labels_layer) -> None:
    """Show one field of the slide: ``labels_layer``, its image and its types on top of the others, the
    other fields' (:func:`in_slide` layers, their images and types) hidden; other layers left as they are."""
    mine = {id(labels_layer), id(paired_image(viewer, labels_layer)), id(find_types_layer(viewer, labels_layer))}
    for lyr in [lyr for lyr in viewer.layers if in_slide(lyr)]:
        for part in (lyr, paired_image(viewer, lyr), find_types_layer(viewer, lyr)):
            if part is not None:
                part.visible = id(part) in mine


def pooled_types(feature_tables) -> pd.DataFrame:
    """One ``cell_type`` column of every cell of several per-cell tables (a table without types: its
    cells unclassified), for :func:`differential_count` of them together."""
    cols = [f["cell_type"].astype(object) if "cell_type" in f else pd.Series([None] * len(f), dtype=object)
            for f in feature_tables if f is not None]
    if not cols:
        return pd.DataFrame({"cell_type": pd.Series([], dtype=object)})
    return pd.DataFrame({"cell_type": pd.concat(cols, ignore_index=True)})


def _write_type(layer, label: int, cell_type, confidence, corrected) -> tuple:
    """Set one cell's ``cell_type``, ``confidence`` and ``corrected`` in ``layer.features``; returns
    what they were (a missing type as None, a missing confidence as NaN)."""
    f = _with_type_columns(layer.features, ["cell_type", "confidence"]).reset_index(drop=True)
    row = (f["label"] == label).to_numpy()
    old = f.loc[row].iloc[0]
    before = (old["cell_type"] if isinstance(old["cell_type"], str) else None,
              float(old["confidence"]) if pd.notna(old["confidence"]) else np.nan, bool(old["corrected"]))
    col = f["cell_type"].astype(object)
    col[row] = cell_type
    f["cell_type"] = col
    f.loc[row, "confidence"] = confidence
    f.loc[row, "corrected"] = bool(corrected)
    layer.features = f
    return before


# ------------------------------------------------------------------ canvas
def types_layer_name(labels_layer) -> str:
    return f"{labels_layer.name} {TYPES_SUFFIX}"


def find_types_layer(viewer, labels_layer):
    """The ``<labels> types`` points layer of ``labels_layer``: the one made for it (found through its
    metadata even after the labels layer was renamed, and then renamed to match), else by name."""
    name = types_layer_name(labels_layer)
    uid = layer_id(labels_layer)
    by_name = None
    for lyr in viewer.layers:
        if not isinstance(lyr, Points):
            continue
        if uid is not None and lyr.metadata.get(META_KEY, {}).get("types_of_id") == uid:
            if lyr.name != name:
                lyr.name = name
            return lyr
        if lyr.name == name and by_name is None:
            by_name = lyr
    return by_name


def _color(t) -> str:
    return CLASS_COLORS.get(t, OTHER_COLOR)


def render_types(viewer, labels_layer):
    """Create or update the ``<labels> types`` Points layer from the labels layer's features.

    Returns the Points layer (None when there is nothing to show and no layer yet).
    """
    from napari.utils.colormaps.standardize_color import transform_color

    feats = labels_layer.features
    pts = find_types_layer(viewer, labels_layer)
    if not is_classified(feats):
        if pts is not None:
            viewer.layers.remove(pts)
        return None
    rows = feats[pd.notna(feats["cell_type"])]
    coords = rows[["centroid-0", "centroid-1"]].to_numpy(float)
    corrected = rows["corrected"].to_numpy(bool) if "corrected" in rows else np.zeros(len(rows), bool)
    types = rows["cell_type"].astype(str).to_numpy()
    pfeat = pd.DataFrame({
        "label": rows["label"].to_numpy(int),
        "cell_type": types,
        "corrected": corrected,
        "color": [_color(t) for t in types],
    })
    colors = transform_color([_color(t) for t in types]) if len(types) else np.zeros((0, 4))
    area = float(np.median(rows["area"])) if "area" in rows and len(rows) else 100.0
    size = max(3.0, 0.25 * np.sqrt(area))
    if pts is None:
        active = viewer.layers.selection.active
        pts = viewer.add_points(
            coords,
            name=types_layer_name(labels_layer),
            **plane_transform(labels_layer),
            features=pfeat,
            face_color="transparent",  # a ring in the type's colour: the nucleus stays visible under it
            border_color=colors,
            border_width=0.2,
            size=size,
            text={"string": "{cell_type}", "color": {"feature": "color"}, "size": 12, "anchor": "upper_left",
                  "translation": [-size, size]},
            metadata={META_KEY: {"types_of": labels_layer.name, "types_of_id": layer_id(labels_layer)}},
        )
        if active is not None:  # keep the user's layer active (clicks pick cells on the labels)
            viewer.layers.selection.active = active
    else:
        pts.data = coords
        pts.features = pfeat
        pts.border_color = colors
        pts.refresh_text()
    return pts


def apply_classification(viewer, labels_layer, table, classifier=None) -> None:
    """Merge a classification table into ``labels_layer.features`` and redraw the types; ``classifier``:
    the model file that typed them (see :func:`note_classifier`)."""
    labels_layer.features = merge_classification(labels_layer.features, table)
    note_classifier(labels_layer, classifier)
    render_types(viewer, labels_layer)


def note_classifier(labels_layer, classifier) -> None:
    """Remember in the layer's metadata the classifier file that typed its cells last: the types corrected
    by hand fine-tune that one in Train (its "auto" choice), an adapted classifier included."""
    if classifier is None:
        return
    meta = wbc_meta(labels_layer)
    if meta.get("classifier") != str(classifier):
        labels_layer.metadata = {**labels_layer.metadata, META_KEY: {**meta, "classifier": str(classifier)}}


def typed_by(labels_layer) -> Path | None:
    """The classifier file that typed ``labels_layer``'s cells last (None when unknown or gone)."""
    p = wbc_meta(labels_layer).get("classifier")
    return Path(p) if p and Path(p).is_file() else None


# ------------------------------------------------------------------ widget
REVIEW_SCREEN_PX = 250  # how large 'Next to review' shows a cell at the least


class ClassifyWidget(CancelWhenRemoved, QWidget):
    """Type the segmented cells, show the differential count, correct types by hand, export."""

    SYNC_DELAY_MS = 300

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.worker = None
        self._layer = None  # the labels layer whose events we follow
        self._pending_sync = False
        self._retype = None  # cells changed while a run classified them: typed again when it ends
        self._synced_hash = None  # digest of the labels the table was last brought up to date with
        self._sync_worker = None  # hashes and measures the labels in a thread (seconds on a large smear)
        self._edits = 0  # edit events seen: a measurement that edits overtook is dropped
        # per 'Set type', latest last (at most UNDO_STEPS): (weakref to the labels layer, label, the row
        # before, the cell's footprint then)
        self._undo = []

        self.labels_combo = LayerCombo(napari_viewer, Labels, follow_new=True)
        self.image_combo = LayerCombo(napari_viewer, Image)
        self.image_combo.setToolTip("the image the labels belong to (set from the Segment result when known)")
        self.model_combo = ModelCombo("classifier")
        # lists the devices, then loads the chosen model: both in the background
        self.device_combo = DeviceCombo(then=model_preload(self.model_combo))
        self.buttons = RunButtons("Classify")
        self.buttons.run.clicked.connect(lambda: self.classify())
        self.buttons.cancel.clicked.connect(self.cancel)
        self.progress = make_progress()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.count_table = QTableWidget(0, 3)
        self.count_table.setHorizontalHeaderLabels(["class", "count", "%"])
        self.count_table.verticalHeader().setVisible(False)
        self.count_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.count_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        rows = len(CELL_TYPES) + 1  # every type visible without scrolling (+ unclassified)
        self.count_table.setMinimumHeight(
            self.count_table.horizontalHeader().sizeHint().height()
            + rows * self.count_table.verticalHeader().defaultSectionSize() + 4
        )
        self.total_label = QLabel("total WBCs: 0")
        self.total_label.setWordWrap(True)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.scope_combo.setToolTip(
            "the slide: the cells of every smear segmented or typed in the viewer, counted together as fields "
            "of one slide (a differential is read over 100 WBCs or more); one labels layer per smear: the one "
            "chosen above, else the newest. Corrections go to the labels layer chosen above")
        self.scope_combo.currentIndexChanged.connect(lambda *_: self.refresh_counts())

        self.cell_spin = QSpinBox()
        self.cell_spin.setRange(0, 2**31 - 1)
        self.cell_spin.setToolTip("label id of the cell to correct (click a cell in pan/zoom mode)")
        self.cell_spin.valueChanged.connect(self._show_cell)
        self.type_combo = QComboBox()
        self.type_combo.addItems(CELL_TYPES)
        self.type_combo.setToolTip(f"'{OTHER}': smudge cells, blasts, atypical or unidentifiable cells (never "
                                   "predicted; counted apart, not in the percentages, not learned by the classifier)")
        self.set_type_button = QPushButton("Set type")
        self.set_type_button.setToolTip("set the cell's type; on an unchanged type this confirms it")
        self.set_type_button.clicked.connect(self._on_set_type)
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("undo the last 'Set type' in this layer: the cell's type and its "
                                    "corrected or confirmed mark go back to what they were")
        self.undo_button.clicked.connect(lambda: self.undo_type())
        self.undo_button.setEnabled(False)
        self.review_button = QPushButton("Next to review")
        self.review_button.setToolTip(
            "go to the least confident cell not yet corrected or confirmed (with the slide count: in any "
            "field, which is then shown); 'Set type' confirms it"
        )
        self.review_button.clicked.connect(lambda: self.review_next())
        self.cell_info = QLabel("")
        self.export_button = QPushButton("Export CSV...")
        self.export_button.clicked.connect(self._on_export)
        self.adapt_button = QPushButton("Adapt to the open smears' stain")
        self.adapt_button.setToolTip(
            "a new classifier for a stain unlike the training sets': the chosen model's first batch norms "
            "re-estimated on every segmented cell open in the viewer (at least 50; no type needed). It is "
            "chosen as the model when done: Classify again, and check its calls on cells you know")
        self.adapt_button.clicked.connect(lambda: self.adapt())
        self._adapt_stop = threading.Event()
        self._relay = ProgressRelay(self)
        self._relay.progressed.connect(self._on_adapt_progress)

        form = QFormLayout()
        form.addRow("labels", self.labels_combo)
        form.addRow("image", self.image_combo)
        form.addRow("model", self.model_combo)
        form.addRow("device", self.device_combo)
        fix = QHBoxLayout()
        fix.addWidget(self.cell_spin)
        fix.addWidget(self.type_combo, 1)
        fix.addWidget(self.set_type_button)
        fix.addWidget(self.undo_button)
        lay = scroll_layout(self)
        lay.addLayout(form)
        lay.addWidget(self.buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        head = QHBoxLayout()
        head.addWidget(QLabel("Differential count of"))
        head.addWidget(self.scope_combo, 1)
        lay.addLayout(head)
        lay.addWidget(self.count_table)
        lay.addWidget(self.total_label)
        lay.addWidget(QLabel("Correct or confirm a cell (click it, or review the least confident first)"))
        lay.addLayout(fix)
        lay.addWidget(self.cell_info)
        lay.addWidget(self.review_button)
        lay.addWidget(self.export_button)
        lay.addWidget(self.adapt_button)
        lay.addStretch(1)

        self._sync_timer = QTimer(self)
        self._sync_timer.setSingleShot(True)
        self._sync_timer.setInterval(self.SYNC_DELAY_MS)
        self._sync_timer.timeout.connect(self.sync_cells)

        self.labels_combo.layer_changed.connect(self._follow_layer)
        self._follow_layer(self.labels_combo.layer())
        self._watch_layers(True)
        register(self)

    # ------------------------------------------------------------ layer following
    @property
    def labels_layer(self):
        return self._layer

    def on_closed(self) -> None:
        """Closed: no more measuring or typing on edits, no click handler left on the layer (which
        also kept the closed widget alive)."""
        self._sync_timer.stop()
        self._follow_layer(None)
        self._watch_layers(False)

    def on_reopened(self) -> None:
        self._follow_layer(self.labels_combo.layer())
        self._watch_layers(True)

    def _watch_layers(self, on: bool) -> None:
        """Follow (or stop following) what changes the slide count: layers added or removed, and any
        labels layer's table (typed by Segment's "classify cells", opened with its table)."""
        layers = self.viewer.layers
        for event, slot in ((layers.events.inserted, self._on_layers_changed),
                            (layers.events.removed, self._on_layers_changed)):
            event.disconnect(slot)
            if on:
                event.connect(slot)
        for lyr in layers:
            if isinstance(lyr, Labels):
                lyr.events.features.disconnect(self._on_any_features)
                if on:
                    lyr.events.features.connect(self._on_any_features)

    def _on_layers_changed(self, event=None) -> None:
        if not alive(self):
            return
        layer = getattr(event, "value", None)
        if isinstance(layer, Labels):
            layer.events.features.disconnect(self._on_any_features)
            if getattr(event, "type", "") == "inserted":
                layer.events.features.connect(self._on_any_features)
        if self.slide_scope:
            self.refresh_counts()

    def _on_any_features(self, event=None) -> None:
        # (the followed layer's table is refreshed by _on_features)
        if alive(self) and self.slide_scope and getattr(event, "source", None) is not self._layer:
            self.refresh_counts()

    def _follow_layer(self, layer) -> None:
        old = self._layer
        if old is not None:
            for name, slot in self._layer_slots():
                try:
                    getattr(old.events, name).disconnect(slot)
                except (TypeError, ValueError, RuntimeError):
                    pass
            if self._on_click in old.mouse_drag_callbacks:
                old.mouse_drag_callbacks.remove(self._on_click)
        self._layer = layer
        self._sync_timer.stop()
        viewer_clicks = self.viewer.mouse_drag_callbacks
        if layer is None and self._on_viewer_click in viewer_clicks:
            viewer_clicks.remove(self._on_viewer_click)
        if layer is not None:
            for name, slot in self._layer_slots():
                getattr(layer.events, name).connect(slot)
            layer.mouse_drag_callbacks.append(self._on_click)
            if self._on_viewer_click not in viewer_clicks:
                viewer_clicks.append(self._on_viewer_click)
            self._synced_hash = None
            # the table brought up to date with the labels as they are now (edited while no Classify
            # widget followed them, or opened without a table)
            self._start_sync(layer)
            image = paired_image(self.viewer, layer)
            if image is not None:
                self.image_combo.set_layer(image)
        self.refresh_counts()
        self._show_cell()
        self._update_undo()

    def _layer_slots(self):
        return [
            ("paint", self._on_labels_edited),
            ("data", self._on_labels_edited),
            ("set_data", self._on_labels_edited),  # also undo/redo (and plain refreshes: hash-checked)
            ("features", self._on_features),
            ("selected_label", self._on_selected_label),
        ]

    def _on_labels_edited(self, event=None) -> None:
        if alive(self):
            self._edits += 1
            self._sync_timer.start()

    def _on_features(self, event=None) -> None:
        if alive(self):
            self.refresh_counts()
            self._show_cell()

    def _on_selected_label(self, event=None) -> None:
        if alive(self) and self._layer is not None and self._has_cell(int(self._layer.selected_label)):
            self.pick_cell(int(self._layer.selected_label))

    def _on_viewer_click(self, viewer, event):
        """A click while another layer is selected (the image, the types points) picks a cell too, unless
        that layer is being edited (napari calls only the selected layer's click handlers)."""
        active = viewer.layers.selection.active
        if (not alive(self) or self._layer is None or active is self._layer or not self._layer.visible
                or getattr(active, "mode", "pan_zoom") != "pan_zoom"):
            return
        self._pick_at(self._layer, event)

    def _on_click(self, layer, event):
        if layer.mode != "pan_zoom" or not alive(self):
            return
        self._pick_at(layer, event)

    def _pick_at(self, layer, event) -> None:
        value = layer.get_value(
            event.position, view_direction=event.view_direction, dims_displayed=event.dims_displayed, world=True
        )
        if isinstance(value, tuple):  # multiscale: (level, value)
            value = value[-1]
        if value is not None and int(value) > 0:
            self.pick_cell(int(value))

    # ------------------------------------------------------------ counts and cells
    @property
    def slide_scope(self) -> bool:
        """Whether the count is of the slide (every segmented labels layer) rather than the chosen layer."""
        return self.scope_combo.currentIndex() == 1

    def set_slide_scope(self, on: bool) -> None:
        self.scope_combo.setCurrentIndex(1 if on else 0)

    def _counted(self) -> tuple:
        """``(per-cell table, slide fields, layers of the same smears left out)`` the count is of: the
        chosen layer's table (fields None), or the slide's cell types together (:func:`slide_fields`)."""
        if self.slide_scope:
            fields, left_out = slide_fields(self.viewer, self._layer)
            return pooled_types(lyr.features for lyr in fields), fields, left_out
        return (self._layer.features if self._layer is not None else None), None, 0

    def refresh_counts(self) -> None:
        feats, fields, left_out = self._counted()
        table = differential_count(feats)
        self.count_table.setRowCount(len(table))
        for r, row in enumerate(table.itertuples(index=False)):
            pct = "" if pd.isna(row.percent) else f"{row.percent:.1f}"
            for c, text in enumerate((row.cell_type, str(row.count), pct)):
                self.count_table.setItem(r, c, QTableWidgetItem(text))
        n = 0 if feats is None else len(feats)
        n_other = int(table.loc[table["cell_type"] == OTHER, "count"].sum())
        text = f"total WBCs: {n}"
        if fields is not None:
            text += f" in {len(fields)} field{'s' if len(fields) != 1 else ''}"
            if left_out:
                text += (f" (and {left_out} more labels layer{'s' if left_out != 1 else ''} of the same smears, "
                         "not counted: the chosen or newest one counts)")
        if n_other:
            text += f" ({n_other} {OTHER}, not in the percentages)"
        if fields is not None:
            typed = int(table.loc[~table["cell_type"].isin([OTHER, "unclassified"]), "count"].sum())
            more = DIFFERENTIAL_CELLS - typed
            text += (f"; {more} more typed for a {DIFFERENTIAL_CELLS}-cell differential" if more > 0
                     else f"; a {DIFFERENTIAL_CELLS}-cell differential: {typed} typed")
        self.total_label.setText(text)

    def counts(self) -> pd.DataFrame:
        """The differential count as shown in the table: of the chosen labels layer, or of the slide."""
        return differential_count(self._counted()[0])

    def _has_cell(self, label: int) -> bool:
        f = self._layer.features if self._layer is not None else None
        return f is not None and "label" in f and bool((f["label"] == label).any())

    def pick_cell(self, label: int) -> None:
        """Make ``label`` the cell to correct."""
        self.cell_spin.setValue(int(label))
        self._show_cell()

    def next_to_review(self) -> int | None:
        """Label of the least confident classified cell not yet corrected or confirmed (None: none left)."""
        found = least_confident(self._layer.features if self._layer is not None else None)
        return None if found is None else found[1]

    def next_to_review_in_slide(self) -> tuple | None:
        """``(labels layer, label)`` of the least confident cell not yet corrected or confirmed among the
        slide's fields (:func:`slide_fields`; ties: the chosen layer first, then the viewer's order)."""
        layers, _ = slide_fields(self.viewer, self._layer)
        layers = sorted(layers, key=lambda lyr: lyr is not self._layer)  # stable: the chosen one first
        best = None
        for lyr in layers:
            found = least_confident(lyr.features)
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], lyr, found[1])
        return None if best is None else best[1:]

    def review_next(self) -> int | None:
        """Pick the next cell to review and centre the view on it: in the chosen labels layer
        (:meth:`next_to_review`), or with the slide count in any field (:meth:`next_to_review_in_slide`;
        that field's layers are then shown, the other fields' hidden)."""
        if self.slide_scope:
            found = self.next_to_review_in_slide()
            layer, label = found if found is not None else (None, None)
            if layer is not None:
                if layer is not self._layer:
                    self.labels_combo.set_layer(layer)
                show_field(self.viewer, layer)
        else:
            label = self.next_to_review()
        if label is None:
            where = "in the slide" if self.slide_scope else "in this layer"
            self.status.setText(f"nothing left to review {where}: every classified cell is corrected or confirmed")
            return None
        self.pick_cell(label)
        row = self._layer.features.loc[self._layer.features["label"] == label].iloc[0]
        if "centroid-0" in row and pd.notna(row["centroid-0"]):
            centre = self._layer.data_to_world((float(row["centroid-0"]), float(row["centroid-1"])))
            scene = getattr(self.viewer, "scene", None)  # napari >= 0.9: viewer.camera is deprecated
            camera = scene.camera if scene is not None else self.viewer.camera
            camera.center = tuple(float(v) for v in centre)
            if "bbox-2" in row and pd.notna(row["bbox-2"]):  # close enough to judge it: about 250 screen px
                lo = self._layer.data_to_world((float(row["bbox-0"]), float(row["bbox-1"])))
                hi = self._layer.data_to_world((float(row["bbox-2"]), float(row["bbox-3"])))
                extent = max(abs(float(b) - float(a)) for a, b in zip(lo, hi))
                if extent > 0:
                    camera.zoom = max(float(camera.zoom), REVIEW_SCREEN_PX / extent)  # never zooms out
        return label

    def _show_cell(self, *_):
        label = int(self.cell_spin.value())
        if not self._has_cell(label):
            self.cell_info.setText("" if label == 0 else f"no cell {label} in this layer")
            return
        row = self._layer.features.loc[self._layer.features["label"] == label].iloc[0]
        t = row.get("cell_type") if "cell_type" in row else None
        if t is None or (isinstance(t, float) and np.isnan(t)):
            self.cell_info.setText(f"cell {label}: not classified")
            return
        if t in CELL_TYPES:
            self.type_combo.setCurrentText(str(t))
        conf = row.get("confidence")
        how = "corrected" if bool(row.get("corrected", False)) else (
            f"confidence {conf:.2f}" if conf is not None and pd.notna(conf) else "")
        self.cell_info.setText(f"cell {label}: {t} ({how})")

    def _on_set_type(self) -> None:
        try:
            self.set_type(int(self.cell_spin.value()), self.type_combo.currentText())
        except ValueError as e:
            show_error(error_message("Set type", e))

    def set_type(self, label: int, cell_type: str) -> None:
        """Correct one cell's type: features (corrected=True), canvas text and counts update at once;
        :meth:`undo_type` takes it back."""
        layer = self._layer
        if layer is None:
            raise ValueError("no labels layer chosen")
        if cell_type not in CELL_TYPES:
            raise ValueError(f"{cell_type!r} is not a cell type ({', '.join(CELL_TYPES)})")
        if label == 0:
            raise ValueError("no cell chosen: click a cell (in pan/zoom mode), type its label, or use 'Next to review'")
        if not self._has_cell(label):
            raise ValueError(f"there is no cell {label} in {layer.name!r}")
        before = _write_type(layer, label, cell_type, 1.0, True)
        self._undo = [e for e in self._undo if e[0]() is not None and e[0]() in self.viewer.layers]
        self._undo.append((weakref.ref(layer), int(label), before, _footprint(layer.data, label)))
        del self._undo[:-UNDO_STEPS]
        render_types(self.viewer, layer)
        self._update_undo()
        self.status.setText(f"cell {label} set to {cell_type}")

    def _undo_index(self) -> int | None:
        """Where the followed layer's last 'Set type' is in the undo list (None: nothing to undo)."""
        for k in range(len(self._undo) - 1, -1, -1):
            if self._layer is not None and self._undo[k][0]() is self._layer:
                return k
        return None

    def _update_undo(self) -> None:
        self.undo_button.setEnabled(self._undo_index() is not None)

    def undo_type(self) -> int | None:
        """Undo the followed layer's last :meth:`set_type`: that cell's type, confidence and corrected
        mark go back to what they were (uncorrected: 'Next to review' offers it again). Returns its
        label; None when there is nothing to undo or the cell was erased since (said in the status)."""
        k = self._undo_index()
        if k is None:
            self.status.setText("nothing to undo: no type was set in this layer")
            return None
        _, label, before, footprint = self._undo.pop(k)
        self._update_undo()
        layer = self._layer
        if not self._has_cell(label):
            self.status.setText(f"cell {label} is no longer in {layer.name!r}: its type change was not undone")
            return None
        if _footprint(layer.data, label) != footprint:  # segmented again, or repainted: another cell now
            self.status.setText(f"cell {label} of {layer.name!r} changed since its type was set (segmented or "
                                "painted again): its type change was not undone")
            return None
        _write_type(layer, label, *before)
        render_types(self.viewer, layer)
        self.pick_cell(label)
        was = before[0] if isinstance(before[0], str) else "not classified"
        self.status.setText(f"undone: cell {label} is {was} again")
        return label

    # ------------------------------------------------------------ classification
    @property
    def running(self) -> bool:
        return self.worker is not None

    def _image_for(self, layer):
        return paired_image(self.viewer, layer) or self.image_combo.layer()

    def classify(self, ids=None):
        """Classify the cells of the chosen labels layer (only ``ids`` when given); returns the worker."""
        if self.running:
            return None
        layer = self._layer
        if layer is None:
            show_error("Classify WBCs: no labels layer (segment the image first, or open labels)")
            return None
        image_layer = self._image_for(layer)
        if image_layer is None:
            show_error(f"Classify WBCs: choose the image that {layer.name!r} belongs to")
            return None
        model = self.model_combo.model_path()
        if model is None:
            show_error(
                "Classify WBCs: no classifier model available (the shipped model is missing); "
                "choose a model file with 'Browse...'"
            )
            return None
        image = layer_level0(image_layer)  # a lazy image is loaded by the worker
        labels = np.array(layer_image(layer), copy=True)  # the user may paint while this runs
        if image.shape[:2] != labels.shape[-2:] or labels.ndim != 2:
            show_error(
                f"Classify WBCs: labels {layer.name!r} {labels.shape} and image {image_layer.name!r} "
                f"{image.shape[:2]} do not have the same 2-D shape"
            )
            return None
        self.buttons.set_busy(True)
        self.progress.setRange(0, 0)
        what = f"{len(ids)} new cell(s)" if ids is not None else f"cells of {layer.name}"
        self.status.setText(f"classifying {what}...")
        self.worker = start_worker(
            _classify_job,
            image,
            labels,
            model=model,
            device=self.device_combo.device(),
            ids=None if ids is None else [int(i) for i in ids],
            on_yield=self._on_yield,
            on_return=lambda result, layer=layer, labels=labels, model=model: self._on_return(
                layer, *result, labels, classifier=model),
            on_error=self._on_error,
            on_abort=lambda: self.status.setText("cancelled; the table is unchanged"),
            on_finish=self._on_finish,
            owner=self,
        )
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self._adapt_stop.set()  # (an adaptation's work asks this; a classification stops at its next batch)
            self.worker.quit()

    def _adapt_pairs(self) -> list:
        """(labels layer, image layer) of every segmented smear in the viewer: each labels layer with the
        image it was made from (the chosen labels layer with the chosen image when it has none)."""
        pairs = []
        for lyr in self.viewer.layers:
            if isinstance(lyr, Labels):
                img = paired_image(self.viewer, lyr) or (self.image_combo.layer() if lyr is self._layer else None)
                if img is not None:
                    pairs.append((lyr, img))
        return pairs

    def adapt(self):
        """Adapt the chosen classifier to the stain of every segmented smear open in the viewer (a new
        model file, chosen when done); returns the worker."""
        if self.running:
            return None
        model = self.model_combo.model_path()
        if model is None:
            show_error("Adapt: no classifier model to adapt; choose a model file with 'Browse...'")
            return None
        pairs = self._adapt_pairs()
        if not pairs:
            show_error("Adapt: no segmented smear in the viewer (segment some smears of the lab first)")
            return None
        images, labels = [], []
        for lyr, img in pairs:
            image = layer_level0(img)  # a lazy image is loaded by the worker
            lab = np.array(layer_image(lyr), copy=True)  # the user may paint while this runs
            if image.shape[:2] != lab.shape[-2:] or lab.ndim != 2:
                show_error(f"Adapt: labels {lyr.name!r} {lab.shape} and image {img.name!r} {image.shape[:2]} "
                           "do not have the same 2-D shape")
                return None
            images.append(image)
            labels.append(lab)
        self._adapt_stop = stop = threading.Event()
        relay = self._relay
        self.destroyed.connect(stop.set)

        def progress(done, total, stage):
            try:
                relay.progressed.emit(int(done), int(total), stage)
            except RuntimeError:  # the widget was closed: stop, writing nothing
                stop.set()

        self.buttons.set_busy(True)
        self.adapt_button.setEnabled(False)
        self.progress.setRange(0, 0)
        self.status.setText(f"adapting {Path(model).stem} to the cells of {len(pairs)} smear(s)...")
        self.worker = start_worker(
            _adapt_job, images, labels, model=model, progress=progress, should_stop=stop.is_set,
            on_return=self._on_adapted, on_error=self._on_adapt_error, on_finish=self._on_adapt_finish,
            owner=self,
        )
        return self.worker

    def _on_adapt_progress(self, done: int, total: int, stage) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.progress.setFormat(f"{'cells of smear' if stage == 'cells' else 'round'} {done}/{total}")

    def _on_adapted(self, path) -> None:
        from napari_wbc.core.models import read_card

        ft = read_card(path).get("finetune", {})
        show = lambda c: ", ".join(f"{v} {k}" for k, v in (c or {}).items() if v)  # noqa: E731
        self.model_combo.add_model(path, select=True)
        from .train import TrainWidget

        for w in find_widgets(self.viewer, TrainWidget):  # listed there (its "auto" takes it once it typed)
            w.classifier_combo.add_model(path, select=False)
        self.status.setText(f"adapted on {ft.get('n_cells')} cells of {ft.get('n_images')} smear(s): "
                            f"{Path(path).stem}, now the model (Classify to type with it). Its calls on these "
                            f"cells: {show(ft.get('types_after'))} (before: {show(ft.get('types_before'))})")

    def _on_adapt_error(self, exc) -> None:
        from napari_wbc.core.adapt import AdaptCancelled

        if isinstance(exc, AdaptCancelled):
            self.status.setText("cancelled; no model was written")
            return
        self.status.setText("failed")
        show_error(error_message("Adapt failed", exc))

    def _on_adapt_finish(self) -> None:
        self.worker = None
        self.buttons.set_busy(False)
        self.adapt_button.setEnabled(True)
        reset_progress(self.progress)
        if self._pending_sync:  # the labels were edited meanwhile: bring the table up to date now
            self._pending_sync = False
            self._sync_timer.start()

    def _on_yield(self, item) -> None:
        done, total = int(item[1]), max(int(item[2]), 1)
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"{done}/{total} batches")

    def _on_return(self, layer, table, measured=None, classified_labels=None, classifier=None) -> None:
        """Merge a run's types; ``measured``: ``cell_features`` of ``classified_labels``, the labels
        it typed (measured in the worker: the GUI thread measures only when they changed since)."""
        if layer not in self.viewer.layers:
            self.status.setText(f"{layer.name!r} was removed while it was classified; nothing to show")
            return
        # the labels may have changed meanwhile (painted, or segmented again): a cell whose pixels
        # changed keeps no type from this run (it is typed again once this run ends); then measure
        # again and merge
        current = layer_image(layer)
        changed = []
        same_shape = classified_labels is not None and classified_labels.shape == current.shape
        if same_shape:
            diff = classified_labels != current
            if diff.any():
                ids = np.union1d(np.unique(classified_labels[diff]), np.unique(current[diff]))
                changed = [int(i) for i in ids if i > 0]
                table = table[~table["label"].isin(changed)]
        if measured is not None and same_shape and not changed:
            feats, _, _ = merge_measured(layer.features, measured)  # measured in the worker
        else:
            feats, _, _ = remeasure(layer.features, current)
        if changed and "cell_type" in feats:  # types from an earlier run belong to the old outlines too
            stale = feats["label"].isin(changed).to_numpy()
            if "corrected" in feats:
                stale = stale & ~feats["corrected"].to_numpy(bool)  # (pandas 3: to_numpy() may be read-only)
            feats.loc[stale, "cell_type"] = None
        layer.features = merge_classification(feats, table)
        note_classifier(layer, classifier)
        render_types(self.viewer, layer)
        present = set(feats["label"].astype(int).tolist())
        self._retype = [i for i in changed if i in present] or None
        n = len(table)
        self.status.setText(f"{n} cell{'s' if n != 1 else ''} classified in {layer.name}"
                            + (f"; {len(self._retype)} changed meanwhile, typed again" if self._retype else ""))

    def _on_error(self, exc) -> None:
        self.status.setText("failed")
        show_error(error_message("Classify WBCs failed", exc))

    def _on_finish(self) -> None:
        self.worker = None
        self.buttons.set_busy(False)
        reset_progress(self.progress)
        retype, self._retype = self._retype, None
        if retype and alive(self):
            self.classify(ids=retype)
            return
        if self._pending_sync:
            self._pending_sync = False
            self._sync_timer.start()

    @property
    def syncing(self) -> bool:
        """True while the labels are hashed or measured in the background."""
        return self._sync_worker is not None

    def sync_cells(self) -> None:
        """Follow edits of the labels: drop erased cells, measure again, classify only new ones.

        The labels are hashed and measured in a thread (about a second on a 70 Mpx smear), on the
        layer's own array: a result that later edits overtook is dropped, and those edits have
        already asked for a new measurement. Only the merge into the table runs on the GUI thread.
        """
        if self._layer is not None and alive(self):
            self._start_sync(self._layer)

    def _start_sync(self, layer) -> None:
        if self.running or self.syncing:
            self._pending_sync = True
            return
        edits = self._edits
        self._sync_worker = start_worker(
            _sync_job,
            layer_level0(layer),
            self._synced_hash,
            on_return=lambda result: self._on_measured(layer, edits, result),
            on_error=lambda exc: show_error(error_message("Classify WBCs: measuring the edited cells failed", exc)),
            on_finish=self._on_sync_finish,
            owner=self,
        )

    def _on_measured(self, layer, edits, result) -> None:
        digest, measured = result
        if layer is not self._layer or not alive(self) or layer not in self.viewer.layers:
            return
        if edits != self._edits or self.running:  # overtaken: measured again when those edits settle
            self._pending_sync = True
            return
        self._synced_hash = digest
        if measured is None:  # unchanged
            return
        had_types = is_classified(layer.features)
        feats, new, removed = merge_measured(layer.features, measured)
        layer.features = feats
        render_types(self.viewer, layer)
        if had_types and new:
            self.classify(ids=new)
        elif removed:
            self.status.setText(f"{len(removed)} cell(s) removed")

    def _on_sync_finish(self) -> None:
        self._sync_worker = None
        if self._pending_sync and not self.running and alive(self):
            self._pending_sync = False
            self._sync_timer.start()

    # ------------------------------------------------------------ export
    def _on_export(self) -> None:
        if self._layer is None and not self.slide_scope:
            show_error("Export CSV: no labels layer chosen")
            return
        folder = Path.home()
        image = self.image_combo.layer()
        source = getattr(getattr(image, "source", None), "path", None)  # beside the smear's file, if opened from one
        if source and Path(source).parent.is_dir():
            folder = Path(source).parent
        path, _ = QFileDialog.getSaveFileName(
            self, "Export cell table", str(folder / f"{'slide' if self.slide_scope else self._layer.name}.csv"),
            "CSV (*.csv)"
        )
        if path:
            try:
                written = self.export_csv(path)
            except (OSError, ValueError) as e:
                show_error(error_message(f"Export CSV to {path!r} failed", e))
                return
            show_info(f"Exported {', '.join(Path(p).name for p in written)}")

    def export_csv(self, path) -> list[Path]:
        """Write the per-cell table to ``path`` and the differential count to ``<stem>_counts.csv``: of
        the chosen labels layer, or with the slide count of every field (its cells named by smear, the
        count of all of them, ``image`` = ``slide (n fields)``)."""
        from napari_wbc.core.io import atomic_write

        if self.slide_scope:
            layers = slide_fields(self.viewer, self._layer)[0]
            if not layers:
                raise ValueError("no segmented labels layer in the viewer")
            names = [field_name(self.viewer, lyr) for lyr in layers]
            count_name = f"slide ({len(layers)} field{'s' if len(layers) != 1 else ''})"
        else:
            if self._layer is None:
                raise ValueError("no labels layer chosen")
            layers = [self._layer]
            image = self.image_combo.layer()
            names = [image.name if image is not None else ""]
            count_name = names[0]
        path = Path(path)
        if path.suffix.lower() != ".csv":
            path = path.with_name(path.name + ".csv")
        # measured now: an edit made a moment ago may not have reached the table yet
        tables = []
        for lyr, name in zip(layers, names):
            feats, _, _ = remeasure(lyr.features, layer_image(lyr))
            feats = feats.drop(columns=["index"], errors="ignore")
            feats.insert(0, "image", name)  # which smear the rows are of (files of many smears can be put together)
            tables.append(feats)
        cells = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
        counts = with_totals(differential_count(pooled_types(tables) if self.slide_scope else tables[0]))
        counts.insert(0, "image", count_name)
        counts_path = path.with_name(f"{path.stem}_counts.csv")
        atomic_write(path, lambda tmp: cells.to_csv(tmp, index=False))
        atomic_write(counts_path, lambda tmp: counts.to_csv(tmp, index=False))
        return [path, counts_path]


def _sync_job(labels, synced_hash):
    """Run by a thread: ``(digest, cell_features or None)``; None when the labels are those of
    ``synced_hash``."""
    digest = data_hash(labels)
    if digest == synced_hash:
        return digest, None
    return digest, cell_features(np.asarray(labels))


def _classify_job(image, labels, *, model, device, ids):
    """Generator run by the worker: yields progress, returns ``(table, cell_features(labels))``."""
    from napari_wbc.core.classify import iter_classify

    table = None
    image = np.asarray(image)
    for item in iter_classify(image, labels, model=model, device=device, ids=ids):
        if item[0] == "progress":
            yield item
        elif item[0] == "table":
            table = item[1]
    return table, cell_features(labels)


def _adapt_job(images, labels, **kwargs) -> Path:
    """Run by the worker (a plain function: adapt_classifier reports through its callback)."""
    from napari_wbc.core.adapt import adapt_classifier

    return adapt_classifier([np.asarray(a) for a in images], labels, **kwargs)  # lazy images computed here


def _footprint(data, label: int) -> tuple:
    """(area, bounding box) of cell ``label``: whether it is still the cell a type was set on."""
    ys, xs = np.nonzero(np.asarray(data) == label)
    if not len(ys):
        return (0,)
    return (len(ys), int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max()))
