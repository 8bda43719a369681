"""Tests for bacon_jax.data: loading, validation, normalisation, sampling, ZCA and TFDS."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bacon_jax import data, errors


def _config(name="digits", source="digits", path="", data_dir="", zca=False):
    return ml_collections.ConfigDict(
        dict(name=name, source=source, path=path, data_dir=data_dir, zca=zca)
    )


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset(_config())


def _write_npz(path, n_train=12, n_test=6, shape=(8, 8, 1), num_classes=10, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
        y_train=np.arange(n_train) % num_classes,
        x_test=rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
        y_test=np.arange(n_test) % num_classes,
    )
    arrays.update(overrides)
    np.savez(path, **arrays)
    return arrays


# Loading.


def test_digits_shapes_and_classes(digits):
    assert digits.x_train.shape[1:] == (8, 8, 1) and digits.x_test.shape[1:] == (8, 8, 1)
    assert digits.x_train.dtype == np.uint8 and digits.x_test.dtype == np.uint8
    assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32
    assert digits.num_train + digits.num_test == 1797
    assert digits.num_test == 540
    assert set(digits.y_train.tolist()) == set(range(10)) == set(digits.y_test.tolist())
    assert digits.x_train.max() == 255 and digits.x_train.min() == 0
    assert digits.zca is None


def test_digits_split_is_deterministic_and_stratified(digits):
    again = data.load_dataset(_config())
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    p_train = np.bincount(digits.y_train, minlength=10) / digits.num_train
    p_test = np.bincount(digits.y_test, minlength=10) / digits.num_test
    np.testing.assert_allclose(p_train, p_test, atol=0.005)


def test_digits_constants_normalise_train_set(digits):
    x = np.asarray(data.normalize(digits.x_train, digits.spec.mean, digits.spec.std))
    assert abs(x.mean()) < 1e-3
    assert abs(x.std() - 1.0) < 1e-3


def test_npz_round_trip(tmp_path):
    path = tmp_path / "d.npz"
    arrays = _write_npz(path)
    ds = data.load_dataset(_config(source="npz", path=str(path)))
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(ds, k), arrays[k])
    assert ds.y_train.dtype == np.int32


@pytest.mark.parametrize(
    "overrides, found",
    [
        (dict(x_train=np.zeros((4, 8, 8, 3), np.uint8)), "(4, 8, 8, 3)"),
        (dict(x_test=np.zeros((4, 8, 8), np.uint8)), "(4, 8, 8)"),
        (dict(x_train=np.zeros((12, 8, 8, 1), np.float32)), "float32"),
    ],
)
def test_npz_bad_images(tmp_path, overrides, found):
    path = tmp_path / "bad.npz"
    _write_npz(path, **overrides)
    with pytest.raises(ValueError) as err:
        data.load_dataset(_config(source="npz", path=str(path)))
    msg = str(err.value)
    assert str(path) in msg and "uint8 [N, 8, 8, 1]" in msg and found in msg


@pytest.mark.parametrize("bad_label", [-1, 10])
def test_npz_bad_labels(tmp_path, bad_label):
    path = tmp_path / "bad.npz"
    y = np.arange(12) % 10
    y[3] = bad_label
    _write_npz(path, y_train=y)
    with pytest.raises(ValueError, match=r"\[0, 10\)") as err:
        data.load_dataset(_config(source="npz", path=str(path)))
    assert str(path) in str(err.value)


def test_npz_missing_key(tmp_path):
    path = tmp_path / "short.npz"
    np.savez(path, x_train=np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="y_test") as err:
        data.load_dataset(_config(source="npz", path=str(path)))
    assert str(path) in str(err.value)


def test_npz_labels_must_match_images(tmp_path):
    path = tmp_path / "bad.npz"
    _write_npz(path, y_test=np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="y_test"):
        data.load_dataset(_config(source="npz", path=str(path)))


def test_missing_npz_says_how_to_get_the_dataset(tmp_path):
    missing = tmp_path / "mnist.npz"
    with pytest.raises(errors.UserError) as err:
        data.load_dataset(_config(name="mnist", source="npz", path=str(missing)))
    msg = str(err.value)
    assert f"{missing} does not exist" in msg
    assert "tfds build mnist --data_dir=DIR --file_format=array_record" in msg
    assert "--config.dataset.source=tfds" in msg and "x_train" in msg and "y_test" in msg


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 4, b"PK\x03\x04garbage"])
def test_unreadable_npz_is_named_without_suggesting_pickles(tmp_path, content):
    path = tmp_path / "random.npz"
    path.write_bytes(content)
    with pytest.raises(errors.UserError) as err:
        data.load_dataset(_config(source="npz", path=str(path)))
    msg = str(err.value)
    assert f"{path} is not a readable .npz" in msg and "np.savez" in msg
    assert "pickle" not in msg.lower()


def test_object_arrays_in_an_npz_are_not_unpickled(tmp_path):
    path = tmp_path / "objects.npz"
    _write_npz(path, y_train=np.array([{"label": 1}] * 12, dtype=object))
    with pytest.raises(errors.UserError) as err:
        data.load_dataset(_config(source="npz", path=str(path)))
    assert "its arrays cannot be read (ValueError)" in str(err.value)
    assert "pickle" not in str(err.value).lower()


def test_npy_instead_of_npz(tmp_path):
    path = tmp_path / "one.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(errors.UserError, match="holds one array, not an .npz"):
        data.load_dataset(_config(source="npz", path=str(path)))


def test_empty_split_and_missing_class_are_named(tmp_path):
    path = tmp_path / "empty_test.npz"
    _write_npz(path, x_test=np.zeros((0, 8, 8, 1), np.uint8), y_test=np.zeros(0, np.int64))
    with pytest.raises(errors.UserError, match="the test split of 'digits' is empty"):
        data.load_dataset(_config(source="npz", path=str(path)))
    path = tmp_path / "no_class_4.npz"
    labels = np.arange(20) % 10
    labels[labels == 4] = 5
    _write_npz(path, n_train=20, y_train=labels)
    dataset = data.load_dataset(_config(source="npz", path=str(path)))  # loads: evaluation may
    with pytest.raises(errors.UserError, match=r"classes \[4\] have no training example"):
        dataset.check_every_class_present()


def test_unknown_name_and_source():
    with pytest.raises(ValueError, match="imagenet21k") as err:
        data.load_dataset(_config(name="imagenet21k"))
    assert "cifar10" in str(err.value) and "digits" in str(err.value)
    with pytest.raises(ValueError, match="hdf5") as err:
        data.load_dataset(_config(source="hdf5"))
    assert all(s in str(err.value) for s in data.SOURCES)
    with pytest.raises(ValueError, match="mnist"):
        data.load_dataset(_config(name="mnist", source="digits"))
    with pytest.raises(ValueError, match="'digits' has no TFDS source"):
        data.load_dataset(_config(name="digits", source="tfds"))


def test_dataset_table():
    assert data.DATASETS["svhn"].tfds_name == "svhn_cropped"
    assert data.DATASETS["cifar100"].num_classes == 100
    assert data.DATASETS["tiny_imagenet"].image_shape == (64, 64, 3)
    for name, spec in data.DATASETS.items():
        assert spec.name == name
        assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]


# Normalisation.


def test_normalize_denormalize_round_trip():
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    mean, std = data.DATASETS["cifar10"].mean, data.DATASETS["cifar10"].std
    z = jax.jit(data.normalize)(x, mean, std)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z[..., 1], (x[..., 1] / 255 - mean[1]) / std[1], rtol=1e-5)
    np.testing.assert_allclose(data.denormalize(z, mean, std), x / 255, atol=1e-6)


def test_preprocessing_without_zca(digits):
    prep = digits.preprocessing
    assert not prep.is_zca
    np.testing.assert_array_equal(
        prep.preprocess(digits.x_test[:7]),
        data.normalize(digits.x_test[:7], digits.spec.mean, digits.spec.std),
    )


# Sampling.


def test_class_index():
    labels = np.array([2, 0, 2, 1, 0, 2, 2])
    index, counts = data.class_index(labels, 3)
    assert index.dtype == np.int32 and counts.dtype == np.int32
    np.testing.assert_array_equal(counts, [2, 1, 4])
    np.testing.assert_array_equal(index, [[1, 4, 0, 0], [3, 0, 0, 0], [0, 2, 5, 6]])
    with pytest.raises(ValueError, match=r"\[3\]"):
        data.class_index(labels, 4)


def _sampling_problem():
    labels = np.array([0, 1, 1, 2, 0, 1, 2, 1, 1, 0, 1, 1, 2, 1])
    index, counts = data.class_index(labels, 3)
    return labels, jnp.asarray(index), jnp.asarray(counts)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12])
def test_sample_class_indices(n):
    labels, index, counts = _sampling_problem()
    for c in range(3):
        count = int(counts[c])
        for seed in range(5):
            idx, mask = data.sample_class_indices(jax.random.key(seed), index[c], counts[c], n)
            assert idx.shape == (n,) and idx.dtype == jnp.int32 and mask.dtype == jnp.bool_
            k = min(n, count)
            np.testing.assert_array_equal(mask, np.arange(n) < k)
            valid = np.asarray(idx)[:k]
            assert len(set(valid.tolist())) == k
            assert np.all(labels[valid] == c)
            if n >= count:
                assert sorted(valid.tolist()) == np.flatnonzero(labels == c).tolist()


def test_sample_class_indices_keys_and_jit():
    _, index, counts = _sampling_problem()
    sample = jax.jit(data.sample_class_indices, static_argnums=3)
    a, _ = sample(jax.random.key(1), index[1], counts[1], 4)
    b, _ = sample(jax.random.key(1), index[1], counts[1], 4)
    np.testing.assert_array_equal(a, b)
    draws = {
        tuple(sample(jax.random.key(s), index[1], counts[1], 4)[0].tolist()) for s in range(20)
    }
    assert len(draws) > 10


def test_sample_class_indices_is_uniform():
    # All 7 entries of a class of 7, in a row of 10: each lands in slot 0 about equally often.
    keys = jax.random.split(jax.random.key(0), 7000)
    row = jnp.arange(10, dtype=jnp.int32) + 100
    idx, _ = jax.vmap(lambda k: data.sample_class_indices(k, row, 7, 3))(keys)
    freq = np.bincount(np.asarray(idx[:, 0]) - 100, minlength=10)
    assert freq[7:].sum() == 0
    np.testing.assert_allclose(freq[:7] / 7000, 1 / 7, atol=0.02)


def test_sample_class_indices_vmap_over_classes():
    labels, index, counts = _sampling_problem()
    keys = jax.random.split(jax.random.key(3), 3)
    idx, mask = jax.jit(jax.vmap(lambda k, r, c: data.sample_class_indices(k, r, c, 4)))(
        keys, index, counts
    )
    assert idx.shape == (3, 4) and mask.shape == (3, 4)
    for c in range(3):
        one, one_mask = data.sample_class_indices(keys[c], index[c], counts[c], 4)
        np.testing.assert_array_equal(idx[c], one)
        np.testing.assert_array_equal(mask[c], one_mask)
        assert np.all(labels[np.asarray(idx[c])[np.asarray(mask[c])]] == c)


def test_sample_class_indices_batch_matches_one_call_per_class():
    labels, index, counts = _sampling_problem()
    keys = jax.random.split(jax.random.key(4), 3)
    idx, mask = jax.jit(data.sample_class_indices_batch, static_argnums=3)(keys, index, counts, 5)
    for c in range(3):
        one, one_mask = data.sample_class_indices(keys[c], index[c], counts[c], 5)
        np.testing.assert_array_equal(idx[c], one)
        np.testing.assert_array_equal(mask[c], one_mask)


@pytest.mark.parametrize("n", [1, 2, 7, 257, 6742, 60000])
def test_permutation_is_jax_random_permutation(n):
    # The faster sort gives jax's own shuffle (XLA:CPU's sort keeps ties in order, as ours does).
    permute = jax.jit(data.permutation, static_argnums=1)
    for key in [jax.random.PRNGKey(0), jax.random.PRNGKey(11), jax.random.key(3)]:
        np.testing.assert_array_equal(permute(key, n), jax.random.permutation(key, n))


@pytest.mark.parametrize("tie_cap", [64, 4])
def test_stable_argsort_orders_ties_by_index(tie_cap):
    # Rows with a few planted ties (a pair and a triple: 5 tied keys) take the all-pairs count
    # with a cap of 64 and the fallback sort with a cap of 4.
    rng = np.random.default_rng(0)
    keys = np.stack([rng.permutation(1000)[:100] for _ in range(3)]).astype(np.uint32)
    keys[1, 50] = keys[1, 5]
    keys[1, [70, 90]] = keys[1, 60]
    keys[2, [3, 4, 97]] = keys[2, 40]
    order = jax.jit(data._stable_argsort, static_argnums=1)(jnp.asarray(keys), tie_cap)
    for row, got in zip(keys, np.asarray(order)):
        np.testing.assert_array_equal(got, np.argsort(row, kind="stable"))


def test_sample_uniform_indices():
    idx = jax.jit(data.sample_uniform_indices, static_argnums=(1, 2))(jax.random.key(0), 50, 30)
    assert idx.shape == (30,) and idx.dtype == jnp.int32
    assert len(set(idx.tolist())) == 30 and 0 <= int(idx.min()) and int(idx.max()) < 50
    other = data.sample_uniform_indices(jax.random.key(1), 50, 30)
    assert not np.array_equal(idx, other)
    with pytest.raises(ValueError):
        data.sample_uniform_indices(jax.random.key(0), 5, 6)


# ZCA.


def test_zca_whitening_covariance():
    rng = np.random.default_rng(0)
    dim, eps = 6, 0.1
    mix = rng.normal(size=(dim, dim)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    x = (rng.normal(size=(500, dim)) @ mix.T + 0.4).astype(np.float32)
    mean, w = data.fit_zca(x, eps=eps)
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-5)
    np.testing.assert_allclose(w, w.T, atol=1e-5)
    z = np.asarray(data.apply_zca(x, mean, w), np.float64)
    s, u = np.linalg.eigh(np.cov(x.astype(np.float64), rowvar=False))
    cov_eig = u.T @ np.cov(z, rowvar=False) @ u
    np.testing.assert_allclose(cov_eig, np.diag(s / (s + eps)), atol=1e-4)
    # With a tiny eps the whitened covariance is the identity.
    mean0, w0 = data.fit_zca(x, eps=1e-6)
    white = np.asarray(data.apply_zca(x, mean0, w0))
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(dim), atol=2e-3)


def test_apply_zca_on_images_matches_flat():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(20, 2, 2, 3)).astype(np.float32)
    mean, w = data.fit_zca(x.reshape(20, -1))
    flat = data.apply_zca(x.reshape(20, -1), mean, w)
    np.testing.assert_allclose(data.apply_zca(x, mean, w).reshape(20, -1), flat, atol=1e-6)


def test_zca_dataset_skips_mean_std(digits):
    ds = data.load_dataset(_config(zca=True))
    prep = ds.preprocessing
    assert prep.is_zca
    mean, w = ds.zca
    assert mean.shape == (64,) and w.shape == (64, 64)
    got = jax.jit(lambda p, x: p.preprocess(x))(prep, ds.x_train[:9])
    want = data.apply_zca(ds.x_train[:9].astype(np.float32) / 255, mean, w)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (9, 8, 8, 1)
    # Normalising before whitening would give different images.
    normalised = data.normalize(ds.x_train[:9], ds.spec.mean, ds.spec.std)
    assert not np.allclose(got, data.apply_zca(normalised, mean, w), atol=1e-2)
    whitened = np.asarray(prep.preprocess(ds.x_train)).reshape(ds.num_train, -1)
    np.testing.assert_allclose(whitened.mean(0), 0.0, atol=1e-4)


# TFDS.


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "svhn", "cifar10", "cifar100"])
def test_tfds_mock(name, tmp_path):
    spec = data.DATASETS[name]
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_dataset(_config(name=name, source="tfds", data_dir=str(tmp_path)))
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.shape == (6,) + spec.image_shape and x.dtype == np.uint8
        assert y.shape == (6,) and y.dtype == np.int32
        assert y.min() >= 0 and y.max() < spec.num_classes


def test_tfds_not_prepared(tmp_path):
    with pytest.raises(errors.UserError) as err:
        data.load_dataset(_config(name="cifar10", source="tfds", data_dir=str(tmp_path)))
    msg = str(err.value)
    assert "'cifar10'" in msg and str(tmp_path) in msg and "tfds build cifar10" in msg
