"""Tests for bacon_jax.tiny_imagenet: the TFDS builder on a fake zip with the official layout.

The fake archive has the real one's structure (wnids.txt in a non-sorted order,
train/<wnid>/images/*.JPEG with a grayscale image among them, val/images/*.JPEG labelled by
val/val_annotations.txt, an unlabelled test/ folder) with a few classes and images, and goes
through the same code as the real archive.
"""

import io
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from bacon_jax import data, errors, tiny_imagenet

WNIDS = ("n03444034", "n01443537", "n02124075")  # the archive's order, deliberately not sorted


def _jpeg(seed, gray=False, size=64):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if gray:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def write_fake_archive(path, wnids=WNIDS, n_train=4, n_val=5, bad_image=None):
    """Writes a zip with the layout of tiny-imagenet-200.zip; returns the expected examples.

    Train image i of class k is grayscale when i == 0. Validation image j belongs to class
    j % len(wnids).

    Returns:
        {'train': {file_name: (jpeg bytes, label)}, 'test': {...}}.
    """
    root = "tiny-imagenet-200"
    expected = {"train": {}, "test": {}}
    annotations = []
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{root}/wnids.txt", "\n".join(wnids) + "\n")
        archive.writestr(f"{root}/words.txt", "".join(f"{w}\tclass {w}\n" for w in wnids))
        for label, wnid in enumerate(wnids):
            archive.writestr(f"{root}/train/{wnid}/{wnid}_boxes.txt", "")
            for i in range(n_train):
                name = f"{wnid}_{i}.JPEG"
                jpeg = _jpeg(1000 * label + i, gray=i == 0)
                archive.writestr(f"{root}/train/{wnid}/images/{name}", jpeg)
                expected["train"][name] = (jpeg, label)
        for j in range(n_val):
            name, label = f"val_{j}.JPEG", j % len(wnids)
            jpeg = _jpeg(10**6 + j, size=32 if j == bad_image else 64)
            archive.writestr(f"{root}/val/images/{name}", jpeg)
            annotations.append(f"{name}\t{wnids[label]}\t0\t0\t63\t63")
            expected["test"][name] = (jpeg, label)
        archive.writestr(f"{root}/val/val_annotations.txt", "\n".join(annotations) + "\n")
        archive.writestr(f"{root}/test/images/test_0.JPEG", _jpeg(7))
    return expected


def _decoded(jpeg):
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"))


def _read_split(data_dir, split):
    source = tfds.data_source("tiny_imagenet", split=split, data_dir=str(data_dir))
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The fake archive placed in a manual directory and prepared the way TFDS users do it."""
    root = tmp_path_factory.mktemp("tiny")
    manual_dir = root / "manual"
    manual_dir.mkdir()
    expected = write_fake_archive(manual_dir / tiny_imagenet.ARCHIVE_NAME)
    data_dir = root / "tfds"
    builder = tfds.builder("tiny_imagenet", data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir), try_download_gcs=False
        )
    )
    return data_dir, expected


def test_builder_output_matches_archive(prepared):
    data_dir, expected = prepared
    builder = tfds.builder("tiny_imagenet", data_dir=str(data_dir))
    assert isinstance(builder, tiny_imagenet.TinyImagenet)
    assert builder.info.file_format.value == "array_record"
    assert builder.info.metadata["wnids"] == list(WNIDS)
    assert builder.info.features["label"].num_classes == 200
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 12, "test": 5}
    for split in ("train", "test"):
        examples = _read_split(data_dir, split)
        assert sorted(ex["file_name"].decode() for ex in examples) == sorted(expected[split])
        for ex in examples:
            jpeg, label = expected[split][ex["file_name"].decode()]
            assert ex["label"] == label
            assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
            np.testing.assert_array_equal(ex["image"], _decoded(jpeg))
    # Train labels follow wnids.txt order (not sorted); grayscale images come out as RGB.
    for ex in _read_split(data_dir, "train"):
        name = ex["file_name"].decode()
        assert WNIDS[ex["label"]] == name.split("_")[0]
        if name.endswith("_0.JPEG"):
            image = ex["image"]
            assert np.array_equal(image[..., 0], image[..., 1])
            assert np.array_equal(image[..., 0], image[..., 2])


def test_load_dataset(prepared):
    data_dir, expected = prepared
    config = ml_collections.ConfigDict(
        dict(name="tiny_imagenet", source="tfds", data_dir=str(data_dir), path="", zca=False)
    )
    ds = data.load_dataset(config)
    assert ds.num_classes == 200 and ds.image_shape == (64, 64, 3)
    assert ds.x_train.shape == (12, 64, 64, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (5, 64, 64, 3) and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.y_train), [4, 4, 4])
    assert sorted(ds.y_test.tolist()) == sorted(label for _, label in expected["test"].values())
    # Images and labels stay paired: each training image is its class's JPEG.
    by_label = {}
    for jpeg, label in expected["train"].values():
        by_label.setdefault(label, []).append(_decoded(jpeg))
    for x, y in zip(ds.x_train, ds.y_train):
        assert any(np.array_equal(x, candidate) for candidate in by_label[int(y)])
    z = np.asarray(ds.preprocessing.preprocess(ds.x_test[:2]))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # SPEC §1.1
    want = (ds.x_test[:2] / 255.0 - mean) / std
    np.testing.assert_allclose(z, want, atol=1e-5)


def test_not_prepared_names_dataset_dir_and_command(tmp_path):
    config = ml_collections.ConfigDict(
        dict(name="tiny_imagenet", source="tfds", data_dir=str(tmp_path), path="", zca=False)
    )
    with pytest.raises(errors.UserError) as err:
        data.load_dataset(config)
    msg = str(err.value)
    assert "'tiny_imagenet'" in msg and str(tmp_path) in msg
    assert "python -m bacon_jax.tiny_imagenet --zip=" in msg and f"--data_dir={tmp_path}" in msg


def test_cli_without_tensorflow_any_name_and_extracted_folder(tmp_path):
    """`python -m bacon_jax.tiny_imagenet` from a zip and from a folder, never importing TF.

    CI has no TensorFlow, so there this also shows that preparing does not need it; where TF is
    installed, the check that it was never imported says the same.
    """
    archive = tmp_path / "my-copy.zip"  # not the official name
    write_fake_archive(archive)
    folder = tmp_path / "extracted"
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    script = (
        "import runpy, sys\n"
        "sys.argv = ['tiny_imagenet'] + sys.argv[1:]\n"
        "runpy.run_module('bacon_jax.tiny_imagenet', run_name='__main__', alter_sys=True)\n"
        "assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules), 'TF imported'\n"
    )
    for source, data_dir in ((archive, tmp_path / "from_zip"), (folder, tmp_path / "from_dir")):
        result = subprocess.run(
            [sys.executable, "-c", script, f"--zip={source}", f"--data_dir={data_dir}"],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "'train': 12, 'test': 5" in result.stdout
    for split in ("train", "test"):
        from_zip = _read_split(tmp_path / "from_zip", split)
        from_dir = _read_split(tmp_path / "from_dir", split)
        assert [ex["file_name"] for ex in from_zip] == [ex["file_name"] for ex in from_dir]
        for a, b in zip(from_zip, from_dir):
            np.testing.assert_array_equal(a["image"], b["image"])
            assert a["label"] == b["label"]


class _DownloadOnlyManager:
    """A download manager with no manual directory whose download returns a local file."""

    def __init__(self, path):
        self.path, self.urls = path, []

    @property
    def manual_dir(self):
        raise AssertionError("Manual directory not enabled.")

    def download(self, url):
        self.urls.append(url)
        return self.path


def test_without_manual_archive_downloads_official_url(tmp_path):
    archive = tmp_path / "downloaded.zip"
    expected = write_fake_archive(archive, n_train=2, n_val=3)
    builder = tiny_imagenet.TinyImagenet(data_dir=str(tmp_path / "tfds"))
    manager = _DownloadOnlyManager(str(archive))
    generators = builder._split_generators(manager)  # pylint: disable=protected-access
    assert manager.urls == [tiny_imagenet.URL]
    train = dict(generators["train"])
    assert set(train) == {f"train/{w}/images/{w}_{i}.JPEG" for w in WNIDS for i in range(2)}
    assert {k: ex["label"] for k, ex in dict(generators["test"]).items()} == {
        f"val/images/{name}": label for name, (_, label) in expected["test"].items()
    }


@pytest.mark.parametrize(
    "problem, message",
    [
        ("no_wnids", "exactly one wnids.txt"),
        ("unknown_val_wnid", "val_annotations.txt line 2"),
        ("small_image", "val/images/val_1.JPEG: expected a (64, 64, 3) image"),
        ("empty_class", "no training images under train/n09999999/images/"),
    ],
)
def test_malformed_archives_are_named(tmp_path, problem, message):
    archive = tmp_path / "bad.zip"
    write_fake_archive(archive, bad_image=1 if problem == "small_image" else None)
    if problem != "small_image":
        with zipfile.ZipFile(archive) as z:
            files = {n: z.read(n) for n in z.namelist()}
        root = "tiny-imagenet-200/"
        if problem == "no_wnids":
            del files[root + "wnids.txt"]
        elif problem == "unknown_val_wnid":
            lines = files[root + "val/val_annotations.txt"].decode().splitlines()
            lines[1] = lines[1].replace(WNIDS[1], "n00000000")
            files[root + "val/val_annotations.txt"] = "\n".join(lines).encode()
        else:
            files[root + "wnids.txt"] += b"n09999999\n"
        with zipfile.ZipFile(archive, "w") as z:
            for name, content in files.items():
                z.writestr(name, content)
    builder = tiny_imagenet.TinyImagenet(data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        generators = builder._split_generators(  # pylint: disable=protected-access
            _DownloadOnlyManager(str(archive))
        )
        for split in generators.values():
            list(split)
    assert str(archive) in str(err.value)


def test_prepare_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        tiny_imagenet.prepare(str(tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        tiny_imagenet.prepare(str(tmp_path), archive="x.zip", download=True)
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        tiny_imagenet.prepare(str(tmp_path), archive=str(tmp_path / "missing.zip"))
