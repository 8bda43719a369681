"""Tests of interop.py: reading sets other programs wrote, the checks, the conversions, the writers.

The torch tests (`.pt`, pickles) are skipped when torch is not installed (`pip install -e
.[torch]`); CI installs it.
"""

import json
import os
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from bacon_jax import data, errors, interop

DIGITS = data.DATASETS["digits"]
CIFAR = data.DATASETS["cifar10"]


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset(ml_collections.ConfigDict(
        {"name": "digits", "source": "digits", "zca": False}))


def _class_major(ipc=2, num_classes=10):
    return np.repeat(np.arange(num_classes), ipc)


def _normalized_set(digits, ipc=2):
    """(images [C * ipc, 8, 8, 1] in digits' normalized space, labels): real training images."""
    index, _ = digits.train_class_index()
    picks = index[:, :ipc].reshape(-1)
    return np.asarray(digits.preprocessing.preprocess(digits.x_train[picks])), digits.y_train[picks]


def test_layouts_are_detected_and_a_wrong_shape_is_named():
    nhwc = np.zeros((4, 32, 32, 3), np.float32)
    nchw = np.arange(4 * 3 * 32 * 32, dtype=np.float32).reshape(4, 3, 32, 32)
    assert interop.to_nhwc(nhwc, CIFAR, "x")[1] == "NHWC"
    converted, layout = interop.to_nhwc(nchw, CIFAR, "x")
    assert layout == "NCHW" and converted.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(converted[1, 5, 7], nchw[1, :, 5, 7])
    assert interop.to_nhwc(np.zeros((4, 8, 8)), DIGITS, "x")[1] == "NHW"  # one channel only
    with pytest.raises(ValueError) as error:
        interop.to_nhwc(np.zeros((4, 3, 28, 28)), CIFAR, "set.pt")
    assert ("set.pt: images of shape (4, 3, 28, 28) do not fit dataset 'cifar10'; allowed: NCHW "
            "[N, 3, 32, 32] or NHWC [N, 32, 32, 3]") in str(error.value)


def test_labels_integer_one_hot_soft_and_class_major():
    labels = _class_major()
    assert interop.hard_labels(labels, 20, 10, "x")[1] == "integer"
    one_hot = np.eye(10)[labels]
    out, note = interop.hard_labels(one_hot, 20, 10, "x")
    np.testing.assert_array_equal(out, labels)
    assert note == "one-hot" and out.dtype == np.int32
    soft = 0.5 * one_hot + 0.05  # rows sum to 1, argmax the true class
    out, note = interop.hard_labels(soft, 20, 10, "x")
    np.testing.assert_array_equal(out, labels)
    assert note == "argmax of soft labels"
    out, note = interop.hard_labels(None, 20, 10, "x")  # DD-Ranking's default
    np.testing.assert_array_equal(out, labels)
    assert note == "class-major"
    np.testing.assert_array_equal(interop.hard_labels(labels.astype(np.float32), 20, 10, "x")[0],
                                  labels)


@pytest.mark.parametrize("labels,message", [
    (np.arange(20), r"labels must lie in \[0, 10\); found values in \[0, 19\]"),
    (np.zeros(20, int), r"no images of classes \[1, 2, 3, 4, 5, 6, 7, 8, 9\]"),
    (np.full(20, 0.5), "not whole numbers"),
    (np.zeros((20, 3)), r"labels of shape \(20, 3\) do not fit 20 images"),
    (None, "cannot be split class-major"),
])
def test_bad_labels_are_one_clear_error(labels, message):
    with pytest.raises(ValueError, match=message):
        interop.hard_labels(labels, 20 if labels is not None else 21, 10, "set.pt")


def test_conversions_between_spaces(digits):
    images, _ = _normalized_set(digits)
    normalized = interop.space_of("normalized", digits)
    pixels_space = interop.space_of("pixels", digits)
    assert interop.same_space(normalized, digits.preprocessing)
    np.testing.assert_array_equal(interop.convert(images, normalized, digits.preprocessing),
                                  images)  # the DM family's space is ours: unchanged
    pixels = images * 0.376 + 0.3056
    np.testing.assert_allclose(interop.convert(pixels, pixels_space, digits.preprocessing), images,
                               atol=1e-5)
    zca = interop.space_of("zca", digits)  # fitted on the training set, as dataset.zca=True does
    expected_zca = data.zca_of_training_set(digits.x_train)
    np.testing.assert_array_equal(zca.zca_matrix, expected_zca[1])
    whitened = interop.convert(images, normalized, zca)
    flat = (pixels.reshape(len(pixels), -1) - expected_zca[0]) @ expected_zca[1]
    np.testing.assert_allclose(whitened, flat.reshape(images.shape), atol=1e-4)
    np.testing.assert_allclose(interop.convert(whitened, zca, normalized), images, atol=1e-3)


def _write_png_folder(root, digits, names=None, ipc=2):
    """A folder of PNGs written with PIL, as another program would: one sub-folder per class."""
    index, _ = digits.train_class_index()
    for c in range(10):
        folder = os.path.join(root, names[c] if names else f"{c:03d}")
        os.makedirs(folder)
        for k in range(ipc):
            Image.fromarray(digits.x_train[index[c, k], ..., 0]).save(
                os.path.join(folder, f"img{k}.png"))
    return index[:, :ipc].reshape(-1)


def test_png_folder_of_another_program(tmp_path, digits):
    picks = _write_png_folder(str(tmp_path / "set"), digits)
    (raw,) = interop.read_sets(str(tmp_path / "set"), DIGITS)
    prepared = interop.prepare(raw, digits)
    np.testing.assert_array_equal(prepared.labels, _class_major())
    np.testing.assert_allclose(prepared.images,
                               digits.preprocessing.preprocess(digits.x_train[picks]), atol=1e-6)
    assert prepared.info["preprocessing"] == "pixels" and prepared.info["ipc"] == 2
    with pytest.raises(ValueError, match="holds uint8 pixels"):
        interop.prepare(raw, digits, "normalized")
    as_float = interop.RawSet(raw.images.astype(np.float32), raw.labels, "x.npz", "npz")
    with pytest.raises(ValueError, match="values reach 255 .0-255 floats"):
        interop.prepare(as_float, digits, "pixels")


def test_folder_class_names_sort_as_imagefolder_and_bad_folders_are_refused(tmp_path, digits):
    names = [f"class_{chr(ord('a') + c)}" for c in range(10)]  # sorted order = class order
    _write_png_folder(str(tmp_path / "named"), digits, names)
    (raw,) = interop.read_sets(str(tmp_path / "named"), DIGITS, "folder")
    np.testing.assert_array_equal(raw.labels, _class_major())
    os.makedirs(tmp_path / "named" / "extra")
    with pytest.raises(ValueError, match="11 class sub-folders, but dataset 'digits' has 10"):
        interop.read_sets(str(tmp_path / "named"), DIGITS)
    _write_png_folder(str(tmp_path / "big"), digits)
    Image.new("L", (9, 8)).save(str(tmp_path / "big" / "003" / "wide.png"))
    with pytest.raises(ValueError, match="wide.png is 9x8; dataset 'digits' images are 8x8"):
        interop.read_sets(str(tmp_path / "big"), DIGITS)


def test_our_folder_export_reads_back_within_quantisation(tmp_path, digits):
    images, labels = _normalized_set(digits)
    images = images + np.random.RandomState(0).normal(0, 0.1, images.shape).astype(np.float32)
    interop.write_image_folder(str(tmp_path / "out"), images, labels, digits.preprocessing, 10)
    assert sorted(os.listdir(tmp_path / "out")) == [f"{c:03d}" for c in range(10)]
    (raw,) = interop.read_sets(str(tmp_path / "out"), DIGITS)
    prepared = interop.prepare(raw, digits)
    np.testing.assert_array_equal(prepared.labels, labels)
    pixels = interop.unclipped_pixels(images, digits.preprocessing)
    inside = (pixels >= 0) & (pixels <= 1)
    # 8-bit rounding: half a grey level, in the normalized space of std 0.376.
    error = np.abs(prepared.images - images)[inside]
    assert error.max() <= 0.5 / 255 / 0.376 + 1e-6
    back = interop.unclipped_pixels(prepared.images, digits.preprocessing)
    np.testing.assert_allclose(back[~inside], np.clip(pixels, 0, 1)[~inside], atol=1e-6)


def _card(digits):
    return interop.card(dataset_spec=DIGITS, method="dm", ipc=2, expand=True,
                        preprocessing=digits.preprocessing, num_images=20, config_hash="abc")


def test_safetensors_export_is_exact_and_self_describing(tmp_path, digits):
    from safetensors import numpy as safetensors_numpy

    images, labels = _normalized_set(digits)
    path = str(tmp_path / "synthetic.safetensors")
    interop.write_safetensors(path, images, labels, digits.preprocessing, _card(digits))
    stored = safetensors_numpy.load_file(path)  # what the safetensors package reads
    np.testing.assert_array_equal(stored["images"], images)
    np.testing.assert_array_equal(stored["labels"], labels)
    assert interop.read_card(path)["expansion_factor"] == 4
    (raw,) = interop.read_sets(path, DIGITS)
    assert raw.recorded.expand is True and raw.recorded.method == "dm"
    prepared = interop.prepare(raw, digits)
    np.testing.assert_array_equal(prepared.images, images)
    assert prepared.info["preprocessing"] == "recorded"
    with pytest.raises(ValueError, match="records its preprocessing"):
        interop.prepare(raw, digits, "pixels")
    mnist = data.Dataset(data.DATASETS["mnist"], *(np.zeros(0),) * 4)
    with pytest.raises(ValueError, match="holds a set of dataset 'digits', but the config is for "
                                         "'mnist'"):
        interop.prepare(raw, mnist)


def test_foreign_npz_and_safetensors_and_unknown_files(tmp_path, digits):
    from safetensors import numpy as safetensors_numpy

    images, labels = _normalized_set(digits)
    np.savez(tmp_path / "theirs.npz", images=images.transpose(0, 3, 1, 2), labels=labels)
    safetensors_numpy.save_file({"images": images, "labels": labels},
                                str(tmp_path / "theirs.safetensors"))
    for name in ("theirs.npz", "theirs.safetensors"):
        (raw,) = interop.read_sets(str(tmp_path / name), DIGITS)
        assert raw.recorded is None
        prepared = interop.prepare(raw, digits)  # normalized by default
        np.testing.assert_array_equal(prepared.images, images)
    np.savez(tmp_path / "wrong.npz", x=images)
    with pytest.raises(ValueError, match=r"no 'images' array; found \['x'\]"):
        interop.read_sets(str(tmp_path / "wrong.npz"), DIGITS)
    (tmp_path / "set.h5").write_text("")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        interop.read_sets(str(tmp_path / "set.h5"), DIGITS)
    with pytest.raises(errors.UserError, match="missing.pt does not exist"):
        interop.read_sets(str(tmp_path / "missing.pt"), DIGITS)


def test_card_describes_the_set(digits):
    card = _card(digits)
    assert card["class_folders"][:2] == ["000", "001"] and card["class_order"] == list(range(10))
    assert card["preprocessing"]["mean"] == [0.3056] and card["preprocessing"]["kind"] == (
        "normalized")
    assert "lossy" in card["lossy"] and card["config_hash"] == "abc"
    json.dumps(card)


# --------------------------------------------------------------------------------------------
# PyTorch files.


def test_dm_family_pt_files(tmp_path, digits):
    torch = pytest.importorskip("torch")
    images, labels = _normalized_set(digits)
    nchw = torch.tensor(images.transpose(0, 3, 1, 2))
    # DC/DSA/DM res_*.pt: one [images, labels] per experiment.
    torch.save({"data": [[nchw, torch.tensor(labels)], [nchw + 1, torch.tensor(labels)]],
                "accs_all_exps": {"ConvNet": [0.5]}}, str(tmp_path / "res_DM.pt"))
    sets = interop.read_sets(str(tmp_path / "res_DM.pt"), DIGITS)
    assert [s.origin.split()[-1] for s in sets] == ["data[0]", "data[1]"]
    first = interop.prepare(sets[0], digits)
    np.testing.assert_array_equal(first.images, images)
    assert first.info["layout"] == "NCHW" and first.info["preprocessing"] == "normalized"
    # DD-Ranking: a bare image tensor, labels in their own file (or class-major without).
    torch.save(nchw, str(tmp_path / "images.pt"))
    torch.save(torch.tensor(labels[::-1].copy()), str(tmp_path / "labels.pt"))
    (raw,) = interop.read_sets(str(tmp_path / "images.pt"), DIGITS,
                               labels_path=str(tmp_path / "labels.pt"))
    np.testing.assert_array_equal(raw.labels, labels[::-1])
    (raw,) = interop.read_sets(str(tmp_path / "images.pt"), DIGITS)
    assert raw.labels is None and interop.prepare(raw, digits).info["labels"] == "class-major"
    torch.save({"weights": nchw}, str(tmp_path / "model.pt"))
    with pytest.raises(ValueError, match=r"found a dict with keys \['weights'\]"):
        interop.read_sets(str(tmp_path / "model.pt"), DIGITS)


def test_our_pt_export_round_trip(tmp_path, digits):
    torch = pytest.importorskip("torch")
    images, labels = _normalized_set(digits)
    path = str(tmp_path / "synthetic.pt")
    interop.write_torch(path, images, labels, digits.preprocessing, _card(digits))
    stored = torch.load(path, weights_only=True)  # no unpickling of code
    assert tuple(stored["images"].shape) == (20, 1, 8, 8) and stored["labels"].dtype == torch.int64
    assert stored["card"]["dataset"] == "digits"
    (raw,) = interop.read_sets(path, DIGITS)
    prepared = interop.prepare(raw, digits)
    np.testing.assert_array_equal(prepared.images, images)
    assert raw.recorded.expand is True


def test_pickles_load_only_when_allowed(tmp_path, digits):
    torch = pytest.importorskip("torch")
    images, labels = _normalized_set(digits)
    path = str(tmp_path / "acc_0.95.pkl")
    with open(path, "wb") as f:  # IDM/BACON's "best" set
        pickle.dump((torch.tensor(images.transpose(0, 3, 1, 2)), torch.tensor(labels)), f)
    with pytest.raises(ValueError, match="--allow_pickle"):
        interop.read_sets(path, DIGITS)
    with pytest.raises(ValueError, match="--set_format=pickle --allow_pickle"):
        interop.read_sets(path, DIGITS, "pt")  # torch.load(weights_only=True) refuses it
    (raw,) = interop.read_sets(path, DIGITS, allow_pickle=True)
    np.testing.assert_array_equal(interop.prepare(raw, digits).images, images)
