"""adapt_classifier: a classifier's first batch norms re-estimated on a lab's cells (tiny networks, CPU)."""
import json
from pathlib import Path

import numpy as np
import pytest

from napari_wbc.core import adapt


def discs(seed: int, n: int = 6, colour=(110, 60, 150)):
    """A 96x96 smear with ``n`` purple discs (r = 8) and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96]
    image = np.full((96, 96, 3), (235, 205, 215), np.float64)
    labels = np.zeros((96, 96), np.int32)
    centres = [(16 + 32 * (i // 3), 16 + 32 * (i % 3)) for i in range(n)]
    for i, (cy, cx) in enumerate(centres, start=1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 64
        labels[disc] = i
        image[disc] = np.array(colour) * rng.uniform(0.8, 1.2)
    image += rng.normal(0, 5, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


@pytest.fixture
def lab(monkeypatch):
    """Smears of one 'lab' with 12 cells in all; MIN_CELLS lowered to 10 for tiny tests."""
    monkeypatch.setattr(adapt, "MIN_CELLS", 10)
    pairs = [discs(s) for s in range(2)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _state(path):
    from napari_wbc.core.models import read_weights

    return {k: v.clone() for k, v in read_weights(path).items()}


def test_only_the_first_block_statistics_change(tmp_path, tiny_classifier, lab):
    images, labels = lab
    out = adapt.adapt_classifier(images, labels, model=tiny_classifier, output=tmp_path / "a.safetensors")
    assert out == tmp_path / "a.safetensors" and out.is_file()
    before, after = _state(tiny_classifier), _state(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k].numpy(), after[k].numpy())}
    # features.0 is the first convolution block: its two batch norms are layers 1 and 4
    stats = {f"features.0.{i}.{s}" for i in (1, 4) for s in ("running_mean", "running_var")}
    assert {k for k in changed if not k.endswith("num_batches_tracked")} == stats  # no weight, no later block
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["kind"] == "classifier" and card["version"].endswith("+adapted")
    ft = card["finetune"]
    assert ft["n_cells"] == 12 and ft["n_images"] == 2 and sum(ft["types_after"].values()) == 12
    assert "Adapted to the stain of 2 image(s)" in card["limits"]
    from napari_wbc import classify

    table = classify(images[0], labels[0], model=out, device="cpu")
    assert list(table["label"]) == [1, 2, 3, 4, 5, 6]


def test_same_cells_same_result_and_never_overwritten(tmp_path, tiny_classifier, lab):
    images, labels = lab
    a = adapt.adapt_classifier(images, labels, model=tiny_classifier, output=tmp_path / "a.safetensors")
    b = adapt.adapt_classifier(images, labels, model=tiny_classifier, output=tmp_path / "b.safetensors")
    sa, sb = _state(a), _state(b)
    assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa)
    mtime = a.stat().st_mtime_ns
    with pytest.raises(ValueError, match="a.safetensors' exists"):
        adapt.adapt_classifier(images, labels, model=tiny_classifier, output=a)
    assert a.stat().st_mtime_ns == mtime
    # a folder: a new dated file in it, beside the others
    c = adapt.adapt_classifier(images, labels, model=tiny_classifier, output=tmp_path)
    assert c.parent == tmp_path and c.name.startswith("wbc_classifier_adapted_2") and c not in (a, b)  # no "_ft_"


def test_adapted_then_adapted_or_fine_tuned_cards_say_it_once(tmp_path, tiny_classifier, lab):
    """An adapted classifier adapted again, or fine-tuned, says so once in its version and limits."""
    from napari_wbc.core.finetune import fine_tuned_card

    images, labels = lab
    a = adapt.adapt_classifier(images, labels, model=tiny_classifier, output=tmp_path / "a.safetensors")
    b = adapt.adapt_classifier(images, labels, model=a, output=tmp_path / "b.safetensors")
    card_a = json.loads(a.with_suffix(".json").read_text())
    card_b = json.loads(b.with_suffix(".json").read_text())
    assert card_b["version"] == card_a["version"] and card_a["version"].count("+adapted") == 1
    assert card_b["limits"].count("Adapted to the stain of") == 1
    ft = fine_tuned_card(dict(card_a), card_a, 3)
    assert ft["version"] == card_a["version"] + "+finetuned"
    assert "Adapted to the stain of" not in ft["limits"] and ft["limits"].count("Fine-tuned by its user on 3") == 1


def test_too_few_cells_is_refused(tmp_path, tiny_classifier, lab):
    images, labels = lab
    with pytest.raises(ValueError, match="hold 6 cells; .* at least 10"):
        adapt.adapt_classifier(images[:1], labels[:1], model=tiny_classifier, output=tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_bad_inputs_name_what_was_expected(tmp_path, tiny_classifier, tiny_segmenter, lab):
    images, labels = lab
    with pytest.raises(ValueError, match="2 images but 1 label arrays"):
        adapt.adapt_classifier(images, labels[:1], model=tiny_classifier)
    with pytest.raises(ValueError, match=r"labels\[1\] has shape \(5, 5\)"):
        adapt.adapt_classifier(images, [labels[0], np.zeros((5, 5), int)], model=tiny_classifier)
    with pytest.raises(ValueError, match="is a segmenter, expected a classifier"):
        adapt.adapt_classifier(images, labels, model=tiny_segmenter)
    with pytest.raises(ValueError, match="images is empty"):
        adapt.adapt_classifier([], [], model=tiny_classifier)


def test_cancel_writes_nothing(tmp_path, tiny_classifier, lab):
    images, labels = lab
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3  # after the cells are prepared, during the rounds

    with pytest.raises(adapt.AdaptCancelled):
        adapt.adapt_classifier(images, labels, model=tiny_classifier, output=tmp_path / "a.safetensors",
                               should_stop=stop)
    assert not list(tmp_path.iterdir())


def test_balanced_draws_count_the_predicted_types_as_in_training():
    """90 cells called neutrophils, 10 monocytes: the draws hold about as many of each (the training mix)."""
    from napari_wbc.core.classify import CLASSES

    probs = np.zeros((100, 5))
    probs[:90, 0] = 1.0
    probs[90:, 2] = 1.0
    idx = adapt.balanced_draws(probs, CLASSES, 20000, seed=0)
    share_mono = float(np.mean(idx >= 90))
    assert 0.45 < share_mono < 0.55  # 0.2375 each of the two types present: half and half
    assert set(np.unique(idx[idx >= 90])) == set(range(90, 100))  # every monocyte drawn, none left out
    # a type predicted for almost no cell is not blown up past the floor
    probs2 = np.zeros((1000, 5))
    probs2[:, 0] = 1.0
    probs2[0] = [0, 0, 0, 1, 0]
    idx2 = adapt.balanced_draws(probs2, CLASSES, 20000, seed=0)
    assert np.mean(idx2 == 0) < 0.1  # 1 cell of 1000 with weight t / floor, not t / 0.001


def test_statistics_follow_the_cells_not_the_training_set(tiny_classifier):
    """The re-estimated first batch norm holds the mean of its input over the cells it was shown."""
    import torch

    from napari_wbc.core.models import build_from_card, read_card, read_weights

    card = read_card(tiny_classifier)
    net = build_from_card(card)
    net.load_state_dict(read_weights(tiny_classifier, card))
    net.eval()
    x = torch.rand(40, 4, 32, 32) + 3.0
    a = adapt._statistics(net, x, 1, 0, None)
    bn = adapt.first_batch_norms(a)[0]
    with torch.no_grad():
        expected = net.features[0][0](x).mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, atol=1e-4)
    assert not torch.allclose(adapt.first_batch_norms(net)[0].running_mean, expected, atol=1e-2)


def test_a_network_without_batch_norms_is_refused():
    from torch import nn

    with pytest.raises(ValueError, match="no batch norm in its first convolution blocks"):
        adapt.first_batch_norms(nn.Sequential(nn.Conv2d(4, 4, 3)))


def test_cli_adapt(tmp_path, tiny_classifier, monkeypatch, capsys):
    from PIL import Image

    import napari_wbc.core.segment as seg
    from napari_wbc.cli import main

    monkeypatch.setattr(adapt, "MIN_CELLS", 10)
    folder = tmp_path / "lab"
    folder.mkdir()
    truth = {}
    for s in range(2):
        image, labels = discs(s)
        Image.fromarray(image).save(folder / f"s{s}.png")
        truth[image.tobytes()] = labels
    # the cells as a segmenter would give them (this tests the command, not the segmenter)
    monkeypatch.setattr(seg, "segment", lambda image, **kw: truth[np.ascontiguousarray(image).tobytes()])
    out = tmp_path / "m" / "lab.safetensors"
    out.parent.mkdir()
    rc = main(["adapt", str(folder), "--classifier", str(tiny_classifier), "--out", str(out), "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert Path(cap.out.strip()) == out and out.is_file()
    assert "12 WBCs from 2 image(s)" in cap.err and "--classifier" in cap.err
    # never overwritten: a usage error naming the file, before any image is read
    assert main(["adapt", str(folder), "--classifier", str(tiny_classifier), "--out", str(out)]) == 2
    assert "lab.safetensors' exists" in capsys.readouterr().err
    # too few cells: said, nothing written
    monkeypatch.setattr(adapt, "MIN_CELLS", 50)
    out2 = tmp_path / "m" / "lab2.safetensors"
    assert main(["adapt", str(folder), "--classifier", str(tiny_classifier), "--out", str(out2)]) == 1
    assert "found 12 WBC(s) in 2 image(s)" in capsys.readouterr().err and not out2.exists()
