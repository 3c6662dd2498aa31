"""The npe2 writer: labels -> lossless TIFF + <stem>_cells.csv, atomically."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_wbc._writer import write_labels


def _labels(top=3):
    labels = np.zeros((30, 40), np.int32)
    labels[2:8, 2:8] = 1
    labels[10:20, 10:20] = 2
    labels[22:28, 30:38] = top
    return labels


@pytest.mark.parametrize("as_dict", [False, True])
def test_round_trip_labels_and_features(tmp_path, as_dict):
    labels = _labels()
    features = {"index": [1, 2, 3], "class": ["neutrophil", "lymphocyte", "monocyte"], "area": [36, 100, 48]}
    meta = {"name": "smear mask", "features": features if as_dict else pd.DataFrame(features)}
    written = write_labels(str(tmp_path / "smear.tif"), labels, meta)
    assert written == [str(tmp_path / "smear.tif"), str(tmp_path / "smear_cells.csv")]

    back = tifffile.imread(written[0])
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    pd.testing.assert_frame_equal(pd.read_csv(written[1]), pd.DataFrame(features))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smear.tif", "smear_cells.csv"]  # no temp files left


def test_big_ids_are_uint32(tmp_path):
    labels = _labels(top=70_000)
    path = write_labels(str(tmp_path / "big.tif"), labels, {"features": {}})[0]
    back = tifffile.imread(path)
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("features", [None, {}, pd.DataFrame()])
def test_empty_features_still_list_the_cells(tmp_path, features):
    meta = {} if features is None else {"features": features}
    csv = write_labels(str(tmp_path / "m.tif"), _labels(), meta)[1]
    assert pd.read_csv(csv)["index"].tolist() == [1, 2, 3]


def test_overwrites_and_adds_tif_suffix(tmp_path):
    write_labels(str(tmp_path / "m.tif"), _labels(), {})
    write_labels(str(tmp_path / "m.tif"), np.zeros((4, 4), np.uint8), {})
    assert tifffile.imread(tmp_path / "m.tif").shape == (4, 4)
    tif, csv = write_labels(str(tmp_path / "noext"), _labels(), {})
    assert tif.endswith("noext.tif") and csv.endswith("noext_cells.csv")


def test_refuses_negative_and_float_labels(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        write_labels(str(tmp_path / "neg.tif"), -_labels(), {})
    with pytest.raises(ValueError, match="integers"):
        write_labels(str(tmp_path / "f.tif"), _labels().astype(float), {})
    assert list(tmp_path.iterdir()) == []


def test_through_napari_save(make_napari_viewer, tmp_path):
    """napari picks our writer for a labels layer and hands it the layer's features."""
    viewer = make_napari_viewer()
    viewer.add_labels(_labels(), name="cells", features={"index": [1, 2, 3], "class": ["a", "b", "c"]})
    written = viewer.layers.save(str(tmp_path / "cells.tif"), selected=True, plugin="napari-wbc")
    assert sorted(written) == sorted([str(tmp_path / "cells.tif"), str(tmp_path / "cells_cells.csv")])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells.tif"), _labels())
    assert pd.read_csv(tmp_path / "cells_cells.csv")["class"].tolist() == ["a", "b", "c"]


def test_multiscale_labels_are_saved_at_full_resolution(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    full = np.kron(_labels(), np.ones((2, 2), _labels().dtype))
    viewer.add_labels([full, _labels()], name="pyramid", multiscale=True)
    viewer.layers.save(str(tmp_path / "p.tif"), selected=True, plugin="napari-wbc")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "p.tif"), full)


def test_written_files_have_normal_permissions(tmp_path):
    """Atomic writes must not leave owner-only files (as a bare mkstemp would)."""
    import os
    import stat

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = stat.S_IMODE(plain.stat().st_mode)
    for written in write_labels(str(tmp_path / "m.tif"), _labels(), {}):
        assert stat.S_IMODE(os.stat(written).st_mode) == expected


def test_reader_opens_what_the_writer_wrote(tmp_path):
    from napari_wbc._reader import napari_get_reader

    features = {"index": [1, 2, 3], "class": ["neutrophil", "lymphocyte", "monocyte"]}
    tif = write_labels(str(tmp_path / "smear.tif"), _labels(), {"features": features})[0]
    [(data, kwargs, kind)] = napari_get_reader(tif)(tif)
    assert kind == "labels" and kwargs["name"] == "smear"
    np.testing.assert_array_equal(data, _labels())
    pd.testing.assert_frame_equal(kwargs["features"], pd.DataFrame(features))


def test_the_image_and_the_classifier_that_typed_the_cells_are_kept_in_the_file(tmp_path):
    """Opened again, the layer is paired with its image and Train's auto still knows which classifier
    typed its cells; other metadata is not written."""
    from napari_wbc._reader import napari_get_reader

    meta = {"napari_wbc": {"image_layer": "smear", "classifier": "/models/wbc_classifier_adapted_x.safetensors",
                           "data_hash": "abc"}}
    tif = write_labels(str(tmp_path / "smear.tif"), _labels(), {"metadata": meta})[0]
    [(_, kwargs, _)] = napari_get_reader(tif)(tif)
    assert kwargs["metadata"]["napari_wbc"] == {"image_layer": "smear",
                                                "classifier": "/models/wbc_classifier_adapted_x.safetensors"}


def test_a_cell_table_follows_labels_edited_since_it_was_made(tmp_path):
    """Erased and painted cells (edited with the Classify widget closed): the CSV lists the saved labels."""
    from napari_wbc.core.segment import cell_features

    labels = _labels()
    feats = cell_features(labels)
    feats["cell_type"] = ["neutrophil", "lymphocyte", "monocyte"]
    feats["corrected"] = [False, True, False]
    labels[labels == 1] = 0  # erased
    labels[0:2, 20:30] = 9  # painted
    labels[10:20, 10:15] = 0  # half of cell 2 erased: its area changes
    write_labels(str(tmp_path / "s.tif"), labels, {"features": feats})
    table = pd.read_csv(tmp_path / "s_cells.csv")
    assert list(table["label"]) == [2, 3, 9] and list(table["index"]) == [2, 3, 9]
    assert list(table["area"]) == [50, 48, 20]
    assert table["cell_type"].tolist()[:2] == ["lymphocyte", "monocyte"] and pd.isna(table["cell_type"][2])
    assert table["corrected"].tolist() == [True, False, False]


def test_a_smear_name_beside_batch_outputs_does_not_replace_their_table(tmp_path):
    """Saving labels as x.tif beside the batch's x_labels.tif replaced x_cells.csv, that file's table:
    the batch then counted the wrong cells for x. Refused now, nothing written."""
    lab = np.zeros((20, 20), np.uint16)
    lab[2:8, 2:8] = 1
    tifffile.imwrite(tmp_path / "x_labels.tif", lab)
    (tmp_path / "x_cells.csv").write_text("label,cell_type\n1,lymphocyte\n")
    with pytest.raises(ValueError, match="x_cells.csv.*belongs to 'x_labels.tif'"):
        write_labels(str(tmp_path / "x.tif"), lab, {})
    assert (tmp_path / "x_cells.csv").read_text() == "label,cell_type\n1,lymphocyte\n"
    assert not (tmp_path / "x.tif").exists()
    write_labels(str(tmp_path / "x_labels.tif"), lab, {})  # saving the batch's labels themselves is fine
