"""The user-assigned type "other" (smudge cells, blasts, atypical cells): never predicted, counted on its
own and left out of the differential's percentages, saved and read back, not a classifier example."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wbc.core import batch
from napari_wbc.core.classify import CELL_TYPES, CLASSES, OTHER


def test_one_definition_of_the_types():
    from napari_wbc.core import testing

    assert batch.CLASSES is CLASSES and testing.CLASSES is CLASSES
    assert CELL_TYPES == [*CLASSES, "other"] and OTHER not in CLASSES


def test_batch_differential_counts_other_apart():
    counts, pct = batch.differential(["neutrophil", "neutrophil", "lymphocyte", "other", "other", None])
    assert counts["other"] == 2 and counts["neutrophil"] == 2 and counts["lymphocyte"] == 1
    assert pct["other"] is None
    assert pct["neutrophil"] == pytest.approx(66.7) and pct["lymphocyte"] == pytest.approx(33.3)
    assert sum(v for v in pct.values() if v is not None) == pytest.approx(100.0, abs=0.2)
    counts, pct = batch.differential(["other"])  # nothing typed but "other": no percentages
    assert counts["other"] == 1 and all(v is None for v in pct.values())


def test_batch_summary_and_report_count_other_apart():
    counts, pct = batch.differential(["monocyte", "other"])
    rows = [{"image": "a", "path": "/in/a.png", "status": "ok", "n_wbc": 2, "count": counts, "percent": pct},
            {"image": "b", "path": "/in/b.png", "status": "ok", "n_wbc": 1,
             "count": batch.differential(["monocyte"])[0], "percent": batch.differential(["monocyte"])[1]}]
    df = batch.summary_frame(rows).set_index("image")
    assert df.loc["a", "n_other"] == 1 and df.loc["b", "n_other"] == 0
    assert "pct_other" not in df.columns
    assert df.loc["a", "pct_monocyte"] == 100.0
    html = batch.render_report(rows, {})
    assert "3 WBC(s) found (1 typed other by hand, left out of the percentages)" in html
    assert "2 WBC(s) (1 typed other by hand, left out of the percentages)" in html
    # the overall table: monocytes are all the typed WBCs, "other" has no percent
    assert "monocyte</td><td>2</td><td>100.0</td>" in html and "other</td><td>1</td><td></td>" in html


def test_a_cells_table_corrected_to_other_is_counted_by_the_batch(tmp_path):
    """x_cells.csv with cells set to "other" by hand (saved from napari): the batch's recount reads it."""
    import tifffile

    lab = np.zeros((20, 20), np.uint16)
    lab[1:4, 1:4], lab[6:9, 6:9], lab[12:15, 12:15] = 1, 2, 3
    outs = {"labels": tmp_path / "x_labels.tif", "cells": tmp_path / "x_cells.csv"}
    tifffile.imwrite(outs["labels"], lab)
    pd.DataFrame({"label": [1, 2, 3], "cell_type": ["neutrophil", "other", "lymphocyte"]}).to_csv(outs["cells"])
    row = batch.recount_from_outputs(outs, {"classified": True}, ["cells"])
    assert row["n_wbc"] == 3 and row["count"]["other"] == 1
    assert row["percent"]["neutrophil"] == 50.0 and row["percent"]["other"] is None


def test_other_is_saved_and_read_back_with_the_labels(tmp_path):
    """The writer's labels TIFF + cells CSV and the reader keep a type set to "other" and its mark."""
    from napari_wbc._reader import napari_get_reader
    from napari_wbc._writer import write_labels
    from napari_wbc.core.segment import cell_features

    lab = np.zeros((30, 40), np.int32)
    lab[2:8, 2:8], lab[10:20, 10:20], lab[22:28, 30:38] = 1, 2, 3
    f = cell_features(lab)
    f["cell_type"] = pd.Series(["neutrophil", "other", "lymphocyte"], dtype=object)
    f["confidence"] = [0.9, 1.0, 0.8]
    f["corrected"] = [False, True, False]
    tif = write_labels(str(tmp_path / "smear.tif"), lab, {"features": f})[0]
    (data, meta, kind), = napari_get_reader(tif)(tif)
    back = meta["features"].set_index("label")
    assert kind == "labels" and back.loc[2, "cell_type"] == "other" and bool(back.loc[2, "corrected"])
    counts, pct = batch.differential(back["cell_type"])
    assert counts["other"] == 1 and pct["neutrophil"] == 50.0


def _smear(n=6, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((64, 64, 3), 230, np.uint8)
    lab = np.zeros((64, 64), np.int32)
    yy, xx = np.mgrid[:64, :64]
    for i in range(1, n + 1):
        cy, cx = 8 + 16 * ((i - 1) // 3), 10 + 20 * ((i - 1) % 3)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
        img[m] = rng.integers(40, 160, 3)
        lab[m] = i
    return img, lab


def test_cells_typed_other_are_accepted_but_no_classifier_example():
    from napari_wbc.core.classifier_finetune import _cell_inputs, check_cell_types

    card = {"classes": list(CLASSES), "input_size": 16}
    img, lab = _smear()
    types = [{1: "neutrophil", 2: "neutrophil", 3: "lymphocyte", 4: "lymphocyte", 5: "other", 6: "other"}]
    check_cell_types(types, card)  # "other" is not an unknown type
    x, y = _cell_inputs([img], [lab], types, card)
    assert len(x) == len(y) == 4 and sorted(y) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="names no cell of the classifier's types .2 other"):
        check_cell_types([{5: "other", 6: "other"}], card)
    with pytest.raises(ValueError, match="too few corrected cells"):  # 4 typed, 2 of them other: too few
        check_cell_types([{1: "neutrophil", 3: "lymphocyte", 5: "other", 6: "other"}], card)


def test_the_classifier_fine_tunes_on_a_smear_with_other_cells(tmp_path):
    import warnings

    from napari_wbc.core.classifier_finetune import finetune_classifier
    from napari_wbc.core.models import read_card
    from napari_wbc.core.testing import make_tiny_classifier

    cls = make_tiny_classifier(tmp_path / "cls.safetensors", input_size=16)
    img, lab = _smear()
    types = [{1: "neutrophil", 2: "neutrophil", 3: "lymphocyte", 4: "lymphocyte", 5: "other", 6: "other"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a random network may not beat its base: then the base comes back)
        out = finetune_classifier([img], [lab], types, base=cls, output=tmp_path / "ft.safetensors", device="cpu",
                                  epochs=1)
    if out != cls:
        ft = read_card(out)["finetune"]
        assert ft["n_cells"] == 4 and ft["n_other"] == 2
