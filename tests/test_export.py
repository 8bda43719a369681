"""Tests of export.py: the .npz round trip, the inverse preprocessing, PNG grids, TensorBoard files,
and what a run leaves in its workdir."""

import glob
import importlib.util
import json
import os
import struct

import jax
import numpy as np
import pytest
from PIL import Image

import bacon_jax
from bacon_jax import checkpointing, data, export, interop, train

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
PREP = data.Preprocessing(mean=(0.5,), std=(0.25,))


def _config(arg):
    spec = importlib.util.spec_from_file_location("digits_config",
                                                  os.path.join(CONFIGS, "digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = ("model=ConvNetW8,eval.models=ConvNetW8,eval.epochs=2,eval.num_eval=2,num_exp=1,"
            "log_every=1,batch_real=16,net_num=5,trained_bs=16,model_train_steps=2")
    return module.get_config(f"{arg},{tiny}")


def _class_major(num_classes, ipc, shape=(8, 8, 1), seed=0):
    images = np.random.RandomState(seed).randn(num_classes * ipc, *shape).astype(np.float32)
    return images, np.repeat(np.arange(num_classes, dtype=np.int32), ipc)


def test_npz_round_trip_through_load_synthetic(tmp_path):
    images, labels = _class_major(10, 2)
    exp_dir = tmp_path / "exp1"
    export.export_npz(str(exp_dir / "synthetic.npz"), images, labels, PREP, dataset="digits",
                      method="bacon", ipc=2, expand=True)
    by_path = bacon_jax.load_synthetic(str(exp_dir / "synthetic.npz"))
    by_exp_dir = bacon_jax.load_synthetic(str(exp_dir))
    by_workdir = bacon_jax.load_synthetic(str(tmp_path), exp=1)
    for loaded in (by_path, by_exp_dir, by_workdir):
        np.testing.assert_array_equal(loaded.images, images)
        np.testing.assert_array_equal(loaded.labels, labels)
        assert loaded.images.dtype == np.float32
        np.testing.assert_allclose(loaded.mean, [0.5])
        np.testing.assert_allclose(loaded.std, [0.25])
        assert loaded.zca_mean is None and loaded.zca_matrix is None
        assert (loaded.dataset, loaded.method, loaded.ipc, loaded.expand) == ("digits", "bacon", 2,
                                                                               True)
    expanded_images, expanded_labels = by_path.training_set()
    assert expanded_images.shape == (80, 8, 8, 1)
    np.testing.assert_array_equal(expanded_labels, np.tile(labels, 4))
    # A pytree: arrays are leaves, the description is static.
    doubled = jax.tree.map(lambda x: 2 * x, by_path)
    np.testing.assert_allclose(doubled.images, 2 * images)
    assert doubled.method == "bacon" and doubled.ipc == 2
    with pytest.raises(FileNotFoundError, match="synthetic.npz"):
        bacon_jax.load_synthetic(str(tmp_path), exp=0)
    # exp picks among a workdir's experiments; with one set it would be ignored, so it is refused.
    for one_set in (exp_dir, exp_dir / "synthetic.npz"):
        with pytest.raises(ValueError, match="exp=1 picks one of a workdir's experiments"):
            bacon_jax.load_synthetic(str(one_set), exp=1)
    # jit-safe preprocessing of a traced set: (x / 255 - mean) / std with the set's statistics.
    pixels = np.arange(80, dtype=np.uint8).reshape(5, 4, 4, 1)
    np.testing.assert_allclose(jax.jit(lambda s, x: s.preprocess(x))(by_path, pixels),
                               (pixels / 255.0 - 0.5) / 0.25, rtol=1e-6)


def test_npz_without_expansion_trains_on_stored_images(tmp_path):
    images, labels = _class_major(3, 1)
    path = str(tmp_path / "synthetic.npz")
    export.export_npz(path, images, labels, PREP, dataset="digits", method="dm", ipc=1,
                      expand=False)
    loaded = bacon_jax.load_synthetic(path)
    assert loaded.expand is False
    np.testing.assert_array_equal(loaded.training_set()[0], images)


def test_to_pixels_inverts_mean_std_and_clips():
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, size=(6, 4, 4, 3)).astype(np.uint8)
    prep = data.Preprocessing(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    model_space = np.asarray(prep.preprocess(pixels))
    np.testing.assert_allclose(export.to_pixels(model_space, prep), pixels / 255.0, atol=1e-6)
    # The same from a mapping and from a loaded set's metadata.
    meta = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    np.testing.assert_allclose(export.to_pixels(model_space, meta), pixels / 255.0, atol=1e-6)
    out = export.to_pixels(np.array([[[[-100.0, 0.0, 100.0]]]]), prep)
    np.testing.assert_array_equal(out, [[[[0.0, 0.5, 1.0]]]])


def test_to_pixels_inverts_zca(tmp_path):
    rng = np.random.RandomState(1)
    train_images = rng.randint(0, 256, size=(64, 4, 4, 2)).astype(np.uint8)
    zca_mean, zca_matrix = data.fit_zca(train_images.reshape(64, -1) / 255.0)
    prep = data.Preprocessing((0.5, 0.5), (0.25, 0.25), zca_mean, zca_matrix)
    images = train_images[:5]
    whitened = np.asarray(prep.preprocess(images))
    np.testing.assert_allclose(export.to_pixels(whitened, prep), images / 255.0, atol=1e-4)
    # The metadata survives the npz round trip and still inverts the whitening.
    path = str(tmp_path / "synthetic.npz")
    export.export_npz(path, whitened, np.arange(5), prep, dataset="cifar10", method="idm", ipc=1,
                      expand=True)
    loaded = bacon_jax.load_synthetic(path)
    np.testing.assert_array_equal(loaded.zca_matrix, zca_matrix)
    np.testing.assert_array_equal(loaded.zca_mean, zca_mean)
    assert loaded.preprocessing.is_zca
    # Traced too: the whitening (x / 255 - zca_mean) @ zca_matrix on the flattened image.
    expected = ((images.reshape(5, -1) / 255.0 - zca_mean) @ zca_matrix).reshape(images.shape)
    np.testing.assert_allclose(jax.jit(lambda s, x: s.preprocess(x))(loaded, images), expected,
                               atol=1e-4)
    np.testing.assert_allclose(loaded.pixels(), images / 255.0, atol=1e-4)


def test_grid_png_has_one_row_per_class(tmp_path):
    num_classes, ipc = 10, 3
    # Every image of class c is the flat grey level c / 9 (in pixel space).
    levels = np.repeat(np.arange(num_classes) / 9.0, ipc).astype(np.float32)
    images = np.broadcast_to(((levels - 0.5) / 0.25)[:, None, None, None], (30, 8, 8, 1))
    path = str(tmp_path / "grid.png")
    export.save_grid_png(path, images, PREP, ipc, num_classes)
    picture = np.asarray(Image.open(path))
    # 8 px images are enlarged x4 to 32 px, with 2 px gaps as torchvision draws them.
    assert picture.shape == (num_classes * 34 + 2, ipc * 34 + 2)
    for c in range(num_classes):
        top = 2 + c * 34
        cell = picture[top:top + 32, 2 + 34:2 + 34 + 32]  # class c, second image
        np.testing.assert_array_equal(cell, np.floor(c / 9.0 * 255 + 0.5))
    assert picture[0].max() == 0 and picture[:, 1].max() == 0  # padding
    # Three channels and 32 px images: RGB, no enlargement.
    rgb = np.zeros((4, 32, 32, 3), np.float32)
    export.save_grid_png(str(tmp_path / "rgb.png"), rgb, data.Preprocessing((0.5,) * 3, (0.2,) * 3),
                         2, 2)
    picture = Image.open(str(tmp_path / "rgb.png"))
    assert picture.mode == "RGB" and picture.size == (2 * 34 + 2, 2 * 34 + 2)
    with pytest.raises(ValueError, match="cannot fill"):
        export.grid(rgb, 3, 2)


def read_events(directory):
    """{tag: {step: value}} from the TensorBoard event files in `directory` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

    scalars = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            raw = f.read()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_summary_writer_writes_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    writer = export.create_summary_writer(str(tmp_path))
    assert writer.active
    writer.write_scalars(3, {"train/loss": 1.5, "eval/ConvNet": np.float32(42.0)})
    writer.close()
    assert read_events(str(tmp_path)) == {"train/loss": {3: 1.5}, "eval/ConvNet": {3: 42.0}}
    silent = export.create_summary_writer(str(tmp_path / "other"), just_logging=True)
    silent.write_scalars(0, {"x": 1.0})
    silent.close()
    assert not silent.active and not (tmp_path / "other").exists()


def test_run_writes_npz_pngs_and_events(tmp_path):
    config = _config("ipc1,method=dm,iterations=2,checkpoint_every=2,eval.every=1,"
                     "eval.intermediate=True")
    train.train_and_evaluate(config, str(tmp_path))
    exp_dir = tmp_path / "exp0"
    saved = checkpointing.load_pytree(str(exp_dir / "synthetic"))
    loaded = bacon_jax.load_synthetic(str(tmp_path))
    np.testing.assert_array_equal(loaded.images, np.asarray(saved["images"]))
    np.testing.assert_array_equal(loaded.labels, np.arange(10))
    assert (loaded.dataset, loaded.method, loaded.ipc, loaded.expand) == ("digits", "dm", 1, False)
    np.testing.assert_allclose(loaded.mean, data.DATASETS["digits"].mean)
    # One grid per evaluation (it 1 intermediate, it 2 final) and one of the exported set.
    for name in ("images_it1.png", "images_it2.png", "synthetic.png"):
        assert Image.open(str(exp_dir / name)).size == (1 * 34 + 2, 10 * 34 + 2)
    # The exports for other codebases: the same set, exactly (safetensors, .pt) or as PNGs.
    (raw,) = interop.read_sets(str(exp_dir / export.SAFETENSORS_NAME), data.DATASETS["digits"])
    np.testing.assert_array_equal(raw.images, loaded.images)
    card = json.loads((exp_dir / export.CARD_NAME).read_text())
    assert card == interop.read_card(str(exp_dir / export.SAFETENSORS_NAME))
    assert (card["dataset"], card["method"], card["ipc"], card["expansion_factor"]) == (
        "digits", "dm", 1, 1)
    pngs = sorted(glob.glob(str(exp_dir / export.FOLDER_NAME / "*" / "*.png")))
    assert [os.path.basename(os.path.dirname(p)) for p in pngs] == [f"{c:03d}" for c in range(10)]
    first = np.asarray(Image.open(pngs[0]))
    np.testing.assert_array_equal(first, interop.to_uint8(loaded.pixels()[0, ..., 0]))
    if interop.torch_available():
        (raw,) = interop.read_sets(str(exp_dir / export.TORCH_NAME), data.DATASETS["digits"])
        assert raw.images.shape == (10, 1, 8, 8)  # NCHW
        np.testing.assert_array_equal(raw.images.transpose(0, 2, 3, 1), loaded.images)
    if importlib.util.find_spec("tensorboardX") is not None:
        events = read_events(str(exp_dir))
        assert set(events["eval/ConvNetW8"]) == {1, 2}
        assert set(events["train/image_rms"]) == {0, 1}
        final = json.loads((exp_dir / "final.json").read_text())["accuracies"]["ConvNetW8"]
        final = train.summarize(final)
        assert events["eval/ConvNetW8"][2] == pytest.approx(final["mean"], rel=1e-6)
