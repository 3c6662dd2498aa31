"""The npe2 reader on real smears (when the data is here) and on synthetic odd files."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_wbc._reader import napari_get_reader
from napari_wbc.core.io import ImageReadError


def read(path):
    reader = napari_get_reader(str(path))
    assert callable(reader), f"no reader for {path}"
    return {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in reader(str(path))}


# --- what the reader claims -------------------------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "x.xml", "x.csv", "x.npy", "noext"])
def test_declines_other_suffixes(tmp_path, name):
    (tmp_path / name).write_text("hello")
    assert napari_get_reader(str(tmp_path / name)) is None


def test_declines_directories_and_mixed_lists(tmp_path, sample_path):
    folder = tmp_path / "smears.png"  # a folder whose name looks like an image
    folder.mkdir()
    assert napari_get_reader(str(folder)) is None
    assert napari_get_reader(str(tmp_path)) is None
    (tmp_path / "notes.txt").write_text("hello")
    assert napari_get_reader([str(sample_path), str(tmp_path / "notes.txt")]) is None
    assert napari_get_reader([]) is None


def test_list_of_images(tmp_path, sample_path):
    other = tmp_path / "grey.png"
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(other)
    reader = napari_get_reader([str(sample_path), str(other)])
    names = [kw["name"] for _, kw, _ in reader([str(sample_path), str(other)])]
    assert names == ["BloodImage_00000", "grey"]


# --- real files -------------------------------------------------------------------


def test_shipped_sample(sample_path):
    layers = read(sample_path)
    assert list(layers) == ["BloodImage_00000"]
    data, kwargs, kind = layers["BloodImage_00000"]
    assert kind == "image" and kwargs["rgb"] is True
    assert data.shape == (480, 640, 3) and data.dtype == np.uint8


def test_sigtuple_image_with_mask(data_file):
    image = data_file("sigtuple/train/train-1.jpg")
    data_file("sigtuple/train/train-1-mask.jpg")
    layers = read(image)
    assert set(layers) == {"train-1", "train-1 mask"}
    img, kwargs, kind = layers["train-1"]
    assert kind == "image" and kwargs["rgb"] and img.shape == (128, 128, 3)
    labels, _, kind = layers["train-1 mask"]
    assert kind == "labels" and labels.shape == (128, 128)
    assert labels.dtype.kind in "iu" and labels.max() == 1  # one WBC, JPEG noise thresholded away


def test_sigtuple_mask_file_opens_as_labels(data_file):
    layers = read(data_file("sigtuple/train/train-1-mask.jpg"))
    assert list(layers) == ["train-1-mask"]
    labels, _, kind = layers["train-1-mask"]
    assert kind == "labels" and labels.max() == 1


def test_bccd_image_with_voc_boxes(data_file):
    image = data_file("bccd/images/BloodImage_00000.jpg")
    data_file("bccd/annotations/BloodImage_00000.xml")
    layers = read(image)
    assert set(layers) == {"BloodImage_00000", "BloodImage_00000 WBC boxes"}
    boxes, kwargs, kind = layers["BloodImage_00000 WBC boxes"]
    assert kind == "shapes" and kwargs["shape_type"] == "rectangle"
    assert kwargs["face_color"] == "transparent" and kwargs["edge_width"] > 0
    assert len(boxes) == 1  # one WBC box in this image; its RBC/platelet boxes are left out
    ys, xs = boxes[0][:, 0], boxes[0][:, 1]
    assert (ys.min(), xs.min(), ys.max(), xs.max()) == (177, 260, 376, 491)


# --- synthetic files --------------------------------------------------------------


def test_greyscale_png(tmp_path):
    arr = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    Image.fromarray(arr).save(tmp_path / "grey.png")
    data, kwargs, kind = read(tmp_path / "grey.png")["grey"]
    assert kind == "image" and kwargs["rgb"] is False
    np.testing.assert_array_equal(data, arr)


def test_rgba_png_drops_alpha(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (16, 12, 4), dtype=np.uint8)
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "rgba.png")
    data, kwargs, _ = read(tmp_path / "rgba.png")["rgba"]
    assert kwargs["rgb"] is True and data.shape == (16, 12, 3)
    np.testing.assert_array_equal(data, arr[..., :3])


def test_palette_png(tmp_path):
    idx = (np.arange(10 * 10).reshape(10, 10) % 3).astype(np.uint8)
    im = Image.fromarray(idx, mode="L").convert("P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "pal.png")
    data, kwargs, _ = read(tmp_path / "pal.png")["pal"]
    assert kwargs["rgb"] is True and data.shape == (10, 10, 3)
    np.testing.assert_array_equal(data[0, 1], [0, 255, 0])


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_16bit_greyscale_keeps_values(tmp_path, suffix):
    arr = (np.arange(32 * 32).reshape(32, 32) * 7 + 1000).astype(np.uint16)
    path = tmp_path / f"deep{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, arr)
    else:
        Image.fromarray(arr).save(path)
    data, kwargs, _ = read(path)["deep"]
    assert kwargs["rgb"] is False
    np.testing.assert_array_equal(data, arr)  # not rescaled to 8 bits
    assert kwargs["contrast_limits"] == [1000.0, float(arr.max())]


def test_16bit_rgb_tiff(tmp_path):
    arr = np.random.default_rng(1).integers(0, 4096, (8, 8, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep_rgb.tif", arr, photometric="rgb")
    data, kwargs, _ = read(tmp_path / "deep_rgb.tif")["deep_rgb"]
    assert kwargs["rgb"] is True and data.dtype == np.uint16
    np.testing.assert_array_equal(data, arr)
    assert kwargs["contrast_limits"] == [float(arr.min()), float(arr.max())]


def test_mask_in_sibling_masks_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "c1.png")
    mask = np.zeros((20, 20), np.uint8)
    mask[2:6, 2:6] = 255
    mask[10:15, 10:15] = 128  # a 0/128/255 Tecom-style mask: both parts are foreground
    Image.fromarray(mask).save(tmp_path / "masks" / "c1.png")
    layers = read(tmp_path / "images" / "c1.png")
    labels, _, kind = layers["c1 mask"]
    assert kind == "labels" and labels.max() == 2
    # the mask file opened on its own is a labels layer too
    assert read(tmp_path / "masks" / "c1.png")["c1 mask"][2] == "labels"


def test_mismatched_mask_is_skipped_with_a_warning(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a-mask.png")
    with pytest.warns(UserWarning, match="a-mask.png"):
        layers = read(tmp_path / "a.png")
    assert list(layers) == ["a"]


def test_truncated_jpeg_names_the_file(tmp_path, sample_path):
    broken = tmp_path / "broken smear.jpg"
    broken.write_bytes(sample_path.read_bytes()[:4000])
    reader = napari_get_reader(str(broken))
    assert reader is not None  # the suffix matches: napari must hear why it failed
    with pytest.raises(ImageReadError, match="broken smear.jpg"):
        reader(str(broken))


def test_not_an_image_names_the_file(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    with pytest.raises(ImageReadError, match="fake.png"):
        napari_get_reader(str(fake))(str(fake))


def test_cli_outputs_open_as_labels_with_table(tmp_path):
    """The batch tool's ``x_labels.tif`` + ``x_cells.csv`` open as one labels layer with features."""
    import pandas as pd
    import tifffile

    from napari_wbc._reader import napari_get_reader

    lab = np.zeros((20, 30), np.uint16)
    lab[2:6, 3:9] = 1
    lab[10:15, 10:20] = 2
    tifffile.imwrite(tmp_path / "smear_labels.tif", lab)
    pd.DataFrame({"label": [1, 2], "cell_type": ["neutrophil", "lymphocyte"]}).to_csv(tmp_path / "smear_cells.csv", index=False)
    layers = napari_get_reader(str(tmp_path / "smear_labels.tif"))(str(tmp_path / "smear_labels.tif"))
    assert len(layers) == 1
    data, kwargs, kind = layers[0]
    assert kind == "labels" and data.max() == 2 and data.dtype == np.uint16
    assert list(kwargs["features"]["index"]) == [1, 2]
    assert list(kwargs["features"]["cell_type"]) == ["neutrophil", "lymphocyte"]


@pytest.mark.parametrize("with_labels_file", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_tiff_smear_beside_the_cli_outputs_still_opens_as_an_image(tmp_path, with_labels_file, dtype):
    """``napari-wbc segment dir --out dir`` writes ``x_labels.tif`` + ``x_cells.csv`` beside the smear
    ``x.tif``: the smear must not be taken for saved labels (nor a colour TIFF that merely has a table)."""
    import pandas as pd

    rgb = (np.random.default_rng(0).random((20, 30, 3)) * (255 if dtype == np.uint8 else 4000)).astype(dtype)
    tifffile.imwrite(tmp_path / "x.tif", rgb, photometric="rgb")
    pd.DataFrame({"label": [1], "cell_type": ["neutrophil"]}).to_csv(tmp_path / "x_cells.csv", index=False)
    if with_labels_file:
        lab = np.zeros((20, 30), np.uint16)
        lab[2:6, 3:9] = 1
        tifffile.imwrite(tmp_path / "x_labels.tif", lab)
    layers = napari_get_reader(str(tmp_path / "x.tif"))(str(tmp_path / "x.tif"))
    assert layers[0][2] == "image" and layers[0][0].shape == (20, 30, 3)
    assert (np.asarray(layers[0][0]) == rgb).all()
    if with_labels_file:
        data, kwargs, kind = napari_get_reader(str(tmp_path / "x_labels.tif"))(str(tmp_path / "x_labels.tif"))[0]
        assert kind == "labels" and data.max() == 1 and list(kwargs["features"]["cell_type"]) == ["neutrophil"]


def test_a_greyscale_integer_tiff_with_its_own_table_is_saved_labels(tmp_path):
    """What our writer saves (``x.tif`` + ``x_cells.csv``, no ``x_labels.tif``) still opens as labels."""
    import pandas as pd

    lab = np.zeros((20, 30), np.uint16)
    lab[2:6, 3:9] = 4
    tifffile.imwrite(tmp_path / "x.tif", lab)
    pd.DataFrame({"label": [4]}).to_csv(tmp_path / "x_cells.csv", index=False)
    data, kwargs, kind = napari_get_reader(str(tmp_path / "x.tif"))(str(tmp_path / "x.tif"))[0]
    assert kind == "labels" and data.max() == 4 and list(kwargs["features"]["label"]) == [4]


def _two_touching(dtype, a=1, b=2):
    m = np.zeros((30, 40), dtype)
    m[5:20, 5:15] = a
    m[5:20, 15:25] = b  # touches the first
    m[24:28, 30:36] = a if a == b else 3
    return m


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_instance_label_masks_keep_their_cells(dtype):
    """uint8 ids 0..3 were thresholded at 128 (all cells lost); 16-bit masks with few ids were split
    into connected components (touching cells merged)."""
    from napari_wbc.core.io import mask_to_labels

    m = _two_touching(dtype)
    out = mask_to_labels(m)
    assert out.dtype == np.int32 and (out == m).all()
    m[m == 3] = 0  # only two ids, touching
    assert (mask_to_labels(m) == m).all()


def test_binary_jpeg_and_part_level_masks_become_cells():
    from napari_wbc.core.io import mask_to_labels

    binary = (_two_touching(np.uint8, 255, 255))
    assert mask_to_labels(binary).max() == 2  # the touching pair is one region: a binary mask cannot split it
    jpeg = binary.astype(np.int16)
    rng = np.random.default_rng(0)
    jpeg = np.clip(jpeg + rng.integers(-12, 13, jpeg.shape), 0, 255).astype(np.uint8)  # noise at both ends
    assert len(np.unique(jpeg)) > 3 and (mask_to_labels(jpeg) > 0).sum() == (binary > 0).sum()
    tecom = np.zeros((30, 40), np.uint8)
    tecom[5:25, 5:25] = 128  # cytoplasm
    tecom[10:20, 10:20] = 255  # nucleus
    out = mask_to_labels(tecom)
    assert out.max() == 1 and (out > 0).sum() == 400


def test_mask_file_with_uint8_ids_opens_with_its_cells(tmp_path):
    from napari_wbc.core.io import read_mask

    Image.fromarray(_two_touching(np.uint8)).save(tmp_path / "x-mask.png")
    assert sorted(np.unique(read_mask(tmp_path / "x-mask.png"))) == [0, 1, 2, 3]


def test_tiff_axes_decide_colour_or_stack(tmp_path):
    """Colour samples or 3-4 channels become HxWxC; a stack of greyscale planes (an ImageJ Z-stack,
    3-4 explicit greyscale pages) is refused with the file named instead of read as RGB(A)."""
    from napari_wbc.core.io import read_image

    z = (np.random.default_rng(0).random((4, 30, 40)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", z[:3])  # tifffile: planar RGB (axes SYX)
    tifffile.imwrite(tmp_path / "rgba.tif", np.moveaxis(z, 0, -1), photometric="rgb", extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "zstack.tif", z[:, None], imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "pages.tif", z[:3], photometric="minisblack")
    assert (read_image(tmp_path / "planar.tif") == np.moveaxis(z[:3], 0, -1)).all()
    assert read_image(tmp_path / "rgba.tif").shape == (30, 40, 4)
    for name in ("zstack.tif", "pages.tif"):
        with pytest.raises(ImageReadError, match=rf"{name}.*stack of (4|3) planes"):
            read_image(tmp_path / name)


def test_exif_orientation_is_applied(tmp_path):
    """A phone's photo (EXIF orientation 6: turned 90 degrees) opens upright, as photo viewers show it."""
    from PIL import ImageOps

    from napari_wbc.core.io import read_image

    rgb = np.zeros((20, 50, 3), np.uint8)
    rgb[:5, :10] = (255, 0, 0)  # a red corner tells the turn
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.png", exif=exif.tobytes())
    im.save(tmp_path / "plain.png")
    with Image.open(tmp_path / "phone.png") as ref:
        want = np.asarray(ImageOps.exif_transpose(ref))
    got = read_image(tmp_path / "phone.png")
    assert got.shape == (50, 20, 3) and (got == want).all()
    assert (read_image(tmp_path / "plain.png") == rgb).all()


def test_labels_for_layer_is_uint16_when_the_ids_fit():
    from napari_wbc.core.io import labels_for_layer

    lab = np.zeros((4, 5), np.int32)
    lab[1, 1], lab[2, 3] = 7, 65535
    out = labels_for_layer(lab)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, lab)
    for wide in (np.array([[0, 65536]], np.int32), np.array([[-1, 3]], np.int32), np.array([[0, 70000]], np.uint32)):
        assert labels_for_layer(wide).dtype == wide.dtype  # kept as given
    for dtype in (np.uint8, np.int64):
        assert labels_for_layer(lab.astype(dtype)).dtype == np.uint16


def test_size_limit_is_napari_wbcs_not_pillows(tmp_path, monkeypatch):
    """Pillow refuses images over 2x its MAX_IMAGE_PIXELS as 'decompression bombs' (179 Mpx by default):
    read_image applies its own limit instead (1 Gpx, NAPARI_WBC_MAX_PIXELS), to PNG/JPEG and TIFF alike,
    from the header, with the file named; Pillow's own setting is left as it was."""
    import PIL.Image
    import tifffile

    from napari_wbc.core.io import ImageReadError, read_image

    img = np.full((40, 50, 3), 200, np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", img, photometric="rgb")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 900)  # 2000 px > 2 x 900: Pillow alone would refuse
    for name in ("a.png", "a.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), img)
    assert PIL.Image.MAX_IMAGE_PIXELS == 900
    monkeypatch.setenv("NAPARI_WBC_MAX_PIXELS", "1999")
    for name in ("a.png", "a.tif"):
        with pytest.raises(ImageReadError, match=rf"{name}.*50 x 40 pixels.*NAPARI_WBC_MAX_PIXELS"):
            read_image(tmp_path / name)
    monkeypatch.setenv("NAPARI_WBC_MAX_PIXELS", "2000")
    assert read_image(tmp_path / "a.png").shape == (40, 50, 3)
    monkeypatch.setenv("NAPARI_WBC_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="NAPARI_WBC_MAX_PIXELS='lots'"):
        read_image(tmp_path / "a.png")


def test_the_table_written_last_goes_with_batch_labels(tmp_path):
    """x_labels.tif with both x_cells.csv (the batch's, now also the writer's) and x_labels_cells.csv
    (what the writer named it before): the table written last is the layer's."""
    import os

    import pandas as pd

    from napari_wbc._reader import read_smear

    labels = np.zeros((20, 20), np.uint16)
    labels[2:8, 2:8] = 1
    tifffile.imwrite(tmp_path / "x_labels.tif", labels)
    pd.DataFrame({"label": [1], "cell_type": ["neutrophil"]}).to_csv(tmp_path / "x_cells.csv", index=False)
    pd.DataFrame({"label": [1], "cell_type": ["monocyte"]}).to_csv(tmp_path / "x_labels_cells.csv", index=False)
    os.utime(tmp_path / "x_cells.csv", ns=(1_000_000_000, 1_000_000_000))
    assert read_smear(str(tmp_path / "x_labels.tif"))[0][1]["features"]["cell_type"].tolist() == ["monocyte"]
    os.utime(tmp_path / "x_labels_cells.csv", ns=(500_000_000, 500_000_000))  # a batch --overwrite after it
    assert read_smear(str(tmp_path / "x_labels.tif"))[0][1]["features"]["cell_type"].tolist() == ["neutrophil"]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_large_8bit_images_read_exactly_into_a_writable_array(tmp_path, mode):
    """Big JPEG/PNG smears are filled strip by strip (no second whole copy from Pillow's tobytes)."""
    from napari_wbc.core.io import read_image

    rng = np.random.default_rng(0)
    bands = len(mode)
    shape = (2100, 2050, bands) if bands > 1 else (2100, 2050)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arr, mode).save(tmp_path / "big.png", compress_level=0)
    got = read_image(tmp_path / "big.png")
    assert got.dtype == np.uint8 and got.flags.writeable
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int32])
def test_labels_saved_with_naparis_own_writer_open_as_labels(tmp_path, dtype):
    """Labels saved with napari's builtin TIFF writer (no cells table, no _labels name) opened as an
    image layer that neither Classify nor Train could use; a 16-bit camera picture stays an image."""
    lab = np.zeros((80, 100), dtype)
    lab[10:30, 10:30], lab[40:70, 50:90] = 3, 7
    tifffile.imwrite(tmp_path / "corrected.tif", lab)
    data, kwargs, kind = read(tmp_path / "corrected.tif")["corrected"]
    assert kind == "labels"
    np.testing.assert_array_equal(data, lab)
    # every cell removed (a field with no WBC): what the user saved, labels again (to paint into), not an image
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros_like(lab))
    data, kwargs, kind = read(tmp_path / "empty.tif")["empty"]
    assert kind == "labels" and data.shape == lab.shape and not data.any()
    rng = np.random.default_rng(0)
    picture = (rng.normal(30000, 3000, (80, 100))).astype(np.uint16)
    picture[:, :30] = 0  # black outside the field of view
    tifffile.imwrite(tmp_path / "camera.tif", picture)
    _, kwargs, kind = read(tmp_path / "camera.tif")["camera"]
    assert kind == "image"
    clipped = picture.copy()  # a round field of view on black, the bright background clipped at the top
    yy, xx = np.mgrid[:80, :100]
    clipped[(yy - 40) ** 2 + (xx - 50) ** 2 < 35**2] = 65535
    clipped[(yy - 40) ** 2 + (xx - 50) ** 2 < 10**2] = picture[(yy - 40) ** 2 + (xx - 50) ** 2 < 10**2]  # a cell
    clipped[(yy - 40) ** 2 + (xx - 50) ** 2 >= 35**2] = 0
    for pic, name in ((clipped, "clipped16"), ((clipped // 257).astype(np.uint8), "clipped8")):
        tifffile.imwrite(tmp_path / f"{name}.tif", pic)
        assert read(tmp_path / f"{name}.tif")[name][2] == "image", name
