"""Sample data and the reader, through napari and the manifest."""
from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from napari_wbc._sample_data import make_sample_data, sample_path

VOC = """<annotation><size><width>640</width><height>480</height><depth>3</depth></size>
<object><name>WBC</name><bndbox><xmin>260</xmin><ymin>177</ymin><xmax>491</xmax><ymax>376</ymax></bndbox></object>
<object><name>RBC</name><bndbox><xmin>78</xmin><ymin>336</ymin><xmax>184</xmax><ymax>435</ymax></bndbox></object>
</annotation>"""


def test_sample_path_is_shipped():
    path = sample_path()
    assert path.is_file() and path.name == "BloodImage_00000.jpg"
    assert (path.parent / "LICENSE_BCCD.txt").is_file()


def test_make_sample_data_without_napari():
    [(data, kwargs, kind)] = make_sample_data()
    assert kind == "image" and kwargs["name"] == "BloodImage_00000" and kwargs["rgb"] is True
    assert data.shape == (480, 640, 3) and data.dtype == np.uint8


def test_open_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", "bccd_smear")
    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.name == "BloodImage_00000" and layer.rgb and layer.data.shape == (480, 640, 3)


def test_open_image_with_mask_and_boxes(make_napari_viewer, tmp_path):
    for sub in ("images", "masks", "annotations"):
        (tmp_path / sub).mkdir()
    image = tmp_path / "images" / "smear.jpg"
    shutil.copy(sample_path(), image)
    mask = np.zeros((480, 640), np.uint8)
    mask[180:370, 270:480] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "smear.png")
    (tmp_path / "annotations" / "smear.xml").write_text(VOC)

    viewer = make_napari_viewer()
    viewer.open(str(image), plugin="napari-wbc")
    layers = {layer.name: layer for layer in viewer.layers}
    assert set(layers) == {"smear", "smear mask", "smear WBC boxes"}
    assert layers["smear"].rgb
    assert type(layers["smear mask"]).__name__ == "Labels" and layers["smear mask"].data.max() == 1
    boxes = layers["smear WBC boxes"]
    assert type(boxes).__name__ == "Shapes" and boxes.nshapes == 1 and boxes.shape_type == ["rectangle"]
    assert boxes.face_color[0][3] == 0 and boxes.edge_color[0][3] == 1  # hollow, visible edge


def test_open_sigtuple_pair(make_napari_viewer, data_file):
    image = data_file("sigtuple/train/train-1.jpg")
    viewer = make_napari_viewer()
    viewer.open(str(image), plugin="napari-wbc")
    assert [layer.name for layer in viewer.layers] == ["train-1", "train-1 mask"]


def test_open_16bit_tiff_displays(make_napari_viewer, tmp_path):
    import tifffile

    arr = (np.arange(64 * 64).reshape(64, 64) + 5000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", arr)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "deep.tif"), plugin="napari-wbc")
    layer = viewer.layers["deep"]
    assert layer.data.dtype == np.uint16
    assert tuple(layer.contrast_limits) == (5000, arr.max())
