"""Datasets: host-side loading (numpy), preprocessing and device-side sampling (SPEC §1).

Training and test images are kept on the host as uint8 NHWC arrays and normalised on the fly by
`Preprocessing.preprocess`, either "scale to [0, 1] then per-channel (x - mean) / std" (SPEC §1.1)
or, with the ZCA option, "scale to [0, 1] then whiten" (SPEC §1.2).

Three sources feed `load_dataset`:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits; needs no network, so it is the dataset
  of tests and smoke runs.
* ``npz``: a file with uint8 NHWC arrays ``x_train``, ``x_test`` and integer labels ``y_train``,
  ``y_test``.
* ``tfds``: a TFDS dataset prepared in the ``array_record`` format, read through
  ``tfds.data_source`` so that TensorFlow is not needed. Tiny ImageNet, which is not in the TFDS
  catalogue, is prepared from the official zip by `bacon_jax.tiny_imagenet` (no TensorFlow
  either).

Real-data sampling (SPEC §1.3) is stateless: `class_index` lists each class's dataset indices once,
and `sample_class_indices` / `sample_uniform_indices` draw without replacement from a JAX key.
"""

import dataclasses
import os
import types
import zipfile
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sklearn.datasets
import sklearn.model_selection
import tensorflow_datasets as tfds

from bacon_jax import errors


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset.

    Attributes:
        name: Name used in configs (a key of `DATASETS`).
        image_shape: (H, W, C) of one image.
        num_classes: Number of classes; labels lie in [0, num_classes).
        mean: Per-channel mean of the [0, 1]-scaled training images.
        std: Per-channel standard deviation of the [0, 1]-scaled training images.
        tfds_name: TFDS name of the dataset, or None when it has no TFDS source.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tfds_name: str | None


DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType(
    {
        # Statistics of the reference loaders (SPEC §1.1).
        "mnist": DatasetSpec("mnist", (28, 28, 1), 10, (0.1307,), (0.3081,), "mnist"),
        "fashion_mnist": DatasetSpec(
            "fashion_mnist", (28, 28, 1), 10, (0.2861,), (0.3530,), "fashion_mnist"
        ),
        "svhn": DatasetSpec(
            "svhn",
            (32, 32, 3),
            10,
            (0.4377, 0.4438, 0.4728),
            (0.1980, 0.2010, 0.1970),
            "svhn_cropped",
        ),
        "cifar10": DatasetSpec(
            "cifar10",
            (32, 32, 3),
            10,
            (0.4914, 0.4822, 0.4465),
            (0.2023, 0.1994, 0.2010),
            "cifar10",
        ),
        "cifar100": DatasetSpec(
            "cifar100",
            (32, 32, 3),
            100,
            (0.5071, 0.4866, 0.4409),
            (0.2673, 0.2564, 0.2762),
            "cifar100",
        ),
        # The reference reads the DC/DM `tinyimagenet.pt` release; we prepare the official zip
        # with the builder of `bacon_jax.tiny_imagenet` (the val set is the test split).
        "tiny_imagenet": DatasetSpec(
            "tiny_imagenet",
            (64, 64, 3),
            200,
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
            "tiny_imagenet",
        ),
        # Not in the reference. Mean and population std over all pixels of the training split of
        # `_load_digits` (uint8 images divided by 255, float64): 0.305604..., 0.375962...
        "digits": DatasetSpec("digits", (8, 8, 1), 10, (0.3056,), (0.3760,), None),
    }
)

SOURCES = ("digits", "npz", "tfds")

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# fold_in tag of the validation split's key (train.py folds experiment indices 0, 1, ... into the
# same PRNGKey(seed)).
_VALIDATION_TAG = 0x7A1D

# The split of the bundled digits: 30% test, stratified by class, fixed seed.
_DIGITS_TEST_SIZE = 0.3
_DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessing:
    """Maps stored uint8 images to the space the networks and synthetic images live in.

    Without ZCA: x / 255, then per-channel (x - mean) / std (SPEC §1.1). With ZCA: x / 255, then
    whitening with the fitted (zca_mean, zca_matrix) and no mean/std normalisation (SPEC §1.2).

    A pytree: the ZCA arrays are leaves (so jit takes them as arguments, not as baked-in
    constants), mean and std are static.

    Attributes:
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        zca_mean: [D] mean of the flattened [0, 1] training images, D = H*W*C, or None.
        zca_matrix: [D, D] whitening matrix, or None.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca_mean: np.ndarray | jax.Array | None = None
    zca_matrix: np.ndarray | jax.Array | None = None

    @property
    def is_zca(self) -> bool:
        """Whether images are ZCA-whitened instead of mean/std normalised."""
        return self.zca_matrix is not None

    def preprocess(self, x_uint8: jax.Array) -> jax.Array:
        """Preprocesses images.

        Args:
            x_uint8: [..., H, W, C] uint8 images.

        Returns:
            float32 images of the same shape.
        """
        return preprocess(x_uint8, self.mean, self.std, self.zca_mean, self.zca_matrix)


def preprocess(x_uint8, mean, std, zca_mean=None, zca_matrix=None) -> jax.Array:
    """`Preprocessing.preprocess` with every setting an argument (arrays may be traced).

    Args:
        x_uint8: [..., H, W, C] uint8 images.
        mean, std: [C] per-channel statistics (unused with ZCA).
        zca_mean, zca_matrix: the fitted ZCA whitening, or None for mean/std normalisation.

    Returns:
        float32 images of the same shape.
    """
    if zca_matrix is not None:
        return apply_zca(jnp.asarray(x_uint8, jnp.float32) / 255.0, zca_mean, zca_matrix)
    return normalize(x_uint8, mean, std)


jax.tree_util.register_dataclass(
    Preprocessing, data_fields=["zca_mean", "zca_matrix"], meta_fields=["mean", "std"]
)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset held in host memory.

    Attributes:
        spec: The dataset's `DatasetSpec`.
        x_train: uint8 [N, H, W, C] training images.
        y_train: int32 [N] training labels.
        x_test: uint8 [M, H, W, C] test images.
        y_test: int32 [M] test labels.
        zca: (mean [D], matrix [D, D]) from `fit_zca` on the training set when the ZCA option is
            on, else None.
        x_val: uint8 [V, H, W, C] validation images held out of the training set
            (`hold_out_validation`), or None.
        y_val: int32 [V] validation labels, or None.
    """

    spec: DatasetSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    zca: tuple[np.ndarray, np.ndarray] | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.image_shape

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def max_class_size(self) -> int:
        """Training images in the largest class (what `distill.spec_from_config` needs)."""
        return int(np.max(np.bincount(self.y_train, minlength=self.num_classes)))

    @property
    def preprocessing(self) -> Preprocessing:
        """The `Preprocessing` that maps this dataset's uint8 images to network inputs."""
        if self.zca is None:
            return Preprocessing(self.spec.mean, self.spec.std)
        zca_mean, zca_matrix = self.zca
        return Preprocessing(self.spec.mean, self.spec.std, zca_mean, zca_matrix)

    def check_every_class_present(self) -> None:
        """Raises UserError naming the classes without a training example.

        Distillation draws real images of every class (SPEC 1.3); without this check it fails
        later, after the run has started.
        """
        counts = np.bincount(self.y_train, minlength=self.num_classes)
        empty = np.flatnonzero(counts == 0).tolist()
        if empty:
            raise errors.UserError(
                f"Dataset {self.name!r}: classes {empty} have no training example (distillation "
                f"needs at least one per class, for all {self.num_classes}); check y_train.")

    def train_class_index(self) -> tuple[np.ndarray, np.ndarray]:
        """`class_index` of the training labels."""
        return class_index(self.y_train, self.num_classes)


def load_dataset(dataset_config: ml_collections.ConfigDict) -> Dataset:
    """Loads a dataset as uint8 NHWC arrays.

    Args:
        dataset_config: ConfigDict with fields `name` (a key of `DATASETS`), `source` (one of
            `SOURCES`), `path` (the .npz file for source 'npz'), `data_dir` (TFDS data directory,
            '' for TFDS's default) and `zca` (bool: fit ZCA whitening on the training set,
            SPEC §1.2).

    Returns:
        The `Dataset`.

    Raises:
        errors.UserError: unknown name or source, a source that cannot provide the dataset, a
            missing or unreadable npz file, a TFDS dataset that is not prepared, arrays that do
            not match the dataset's `DatasetSpec`, an empty split or a class without training
            examples.
    """
    name = dataset_config.name
    source = dataset_config.source
    if name not in DATASETS:
        raise errors.UserError(f"Unknown dataset name {name!r}; allowed: {sorted(DATASETS)}.")
    if source not in SOURCES:
        raise errors.UserError(f"Unknown dataset source {source!r}; allowed: {list(SOURCES)}.")
    spec = DATASETS[name]
    if source == "digits":
        if name != "digits":
            raise errors.UserError(
                f"Source 'digits' provides only the dataset 'digits', not {name!r}; "
                f"use source 'npz' or 'tfds' for it."
            )
        arrays = _load_digits()
    elif source == "npz":
        path = dataset_config.get("path", "")
        if not path:
            raise errors.UserError(
                f"Source 'npz' needs dataset.path (a .npz file) for {name!r}. {_how_to_get(spec)}")
        arrays = _load_npz(spec, path)
    else:
        if spec.tfds_name is None:
            with_tfds = sorted(k for k, v in DATASETS.items() if v.tfds_name is not None)
            raise errors.UserError(
                f"Dataset {name!r} has no TFDS source; datasets with one: {with_tfds}."
            )
        arrays = _load_tfds(spec, dataset_config.get("data_dir", ""))
    x_train, y_train, x_test, y_test = arrays
    _check_nonempty(spec, y_train, y_test, origin=_origin(dataset_config))
    zca = None
    if dataset_config.get("zca", False):
        zca = zca_of_training_set(x_train)
    return Dataset(spec, x_train, y_train, x_test, y_test, zca)


def hold_out_validation(dataset: Dataset, per_class: int, seed: int) -> Dataset:
    """Moves `per_class` training images of every class into a validation split (stratified).

    Class c's held-out images are its `per_class` training images with the smallest uniform scores
    drawn from `fold_in(fold_in(PRNGKey(seed), _VALIDATION_TAG), c)` (a uniformly random subset):
    fixed by the seed, the same for every method and device count. The preprocessing stays that of the whole training set
    (the published mean/std are, and a ZCA whitening was fitted when the dataset was loaded).

    Args:
        dataset: a `Dataset` without a validation split.
        per_class: images per class to hold out (`config.dataset.validation_size`); 0 returns
            `dataset` unchanged.
        seed: the run's `config.seed`.

    Returns:
        The `Dataset` with the held-out images removed from `x_train`/`y_train` and placed in
        `x_val`/`y_val` (both in increasing order of their original index).

    Raises:
        ValueError: a negative size, or a class that would keep no training image.
    """
    if per_class == 0:
        return dataset
    if per_class < 0:
        raise errors.UserError(f"dataset.validation_size must be >= 0, got {per_class}.")
    index, counts = class_index(dataset.y_train, dataset.num_classes)
    too_small = np.flatnonzero(counts <= per_class)
    if too_small.size:
        raise errors.UserError(
            f"dataset.validation_size={per_class} leaves no training image in classes "
            f"{too_small.tolist()} of {dataset.name!r} (they have {counts[too_small].tolist()}); "
            f"use at most {int(counts.min()) - 1}.")
    root = jax.random.fold_in(jax.random.PRNGKey(seed), _VALIDATION_TAG)
    # One draw of a static shape for all classes (a permutation per class size would compile once
    # per size); padding slots beyond a class's count are never read.
    scores = np.asarray(jax.vmap(lambda c: jax.random.uniform(
        jax.random.fold_in(root, c), (index.shape[1],)))(np.arange(dataset.num_classes)))
    held = np.sort(np.concatenate([
        index[c, np.argsort(scores[c, :counts[c]], kind="stable")[:per_class]]
        for c in range(dataset.num_classes)
    ]))
    keep = np.ones(dataset.num_train, bool)
    keep[held] = False
    return dataclasses.replace(
        dataset, x_train=dataset.x_train[keep], y_train=dataset.y_train[keep],
        x_val=dataset.x_train[held], y_val=dataset.y_train[held])


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits, split 70/30 stratified by class with a fixed seed.

    The split is `train_test_split(test_size=0.3, stratify=labels, random_state=0)`: 1257 train
    and 540 test images, identical on every call. Pixel values 0..16 become round(v * 255 / 16).
    """
    digits = sklearn.datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
        images,
        labels,
        test_size=_DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=_DIGITS_SPLIT_SEED,
    )
    return x_train, y_train, x_test, y_test


_NPZ_FORMAT = ("a NumPy .npz (np.savez) holding uint8 NHWC images x_train and x_test and integer "
               "labels y_train and y_test")


def _how_to_get(spec: DatasetSpec) -> str:
    """How to provide dataset `spec` when its file is missing: TFDS (if it has a source) or an npz."""
    npz = f"or write {_NPZ_FORMAT} and set --config.dataset.path to it"
    if spec.tfds_name is None:
        return f"Write {_NPZ_FORMAT} and set --config.dataset.path to it."
    return (f"Get {spec.name} with TFDS (needs TensorFlow to build: `tfds build {spec.tfds_name} "
            f"--data_dir=DIR --file_format=array_record`, then run with "
            f"--config.dataset.source=tfds --config.dataset.data_dir=DIR), {npz}.")


def _load_npz(spec: DatasetSpec, path: str) -> tuple[np.ndarray, ...]:
    """Reads and validates the four arrays of an .npz file."""
    if not os.path.isfile(path):
        raise errors.UserError(
            f"Dataset file {path} does not exist (dataset.path; a relative path is from the "
            f"current directory, {os.getcwd()}). {_how_to_get(spec)}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        # Pickled or random bytes included: object arrays are never loaded (allow_pickle stays off).
        raise errors.UserError(
            f"Dataset file {path} is not a readable .npz ({type(error).__name__}); it must be "
            f"{_NPZ_FORMAT}.") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a single .npy array
        raise errors.UserError(f"Dataset file {path} holds one array, not an .npz; it must be "
                               f"{_NPZ_FORMAT}.")
    with npz:
        missing = [k for k in _NPZ_KEYS if k not in npz.files]
        if missing:
            raise errors.UserError(
                f"{path}: missing arrays {missing}; expected keys {list(_NPZ_KEYS)}, "
                f"found {sorted(npz.files)}."
            )
        try:
            arrays = {k: npz[k] for k in _NPZ_KEYS}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise errors.UserError(  # e.g. object arrays, which are never unpickled
                f"Dataset file {path}: its arrays cannot be read ({type(error).__name__}); it "
                f"must be {_NPZ_FORMAT}.") from None
    return _validated(spec, arrays, origin=path)


def _origin(dataset_config) -> str:
    """Where a dataset config reads from, for messages."""
    source = dataset_config.source
    if source == "npz":
        return dataset_config.get("path", "")
    if source == "tfds":
        return f"TFDS (data_dir={dataset_config.get('data_dir', '') or 'default'})"
    return "scikit-learn's digits"


def _check_nonempty(spec: DatasetSpec, y_train: np.ndarray, y_test: np.ndarray,
                    origin: str) -> None:
    for split, labels in (("train", y_train), ("test", y_test)):
        if len(labels) == 0:
            raise errors.UserError(f"{origin}: the {split} split of {spec.name!r} is empty.")


def _validated(
    spec: DatasetSpec, arrays: Mapping[str, np.ndarray], origin: str
) -> tuple[np.ndarray, ...]:
    """Checks arrays against `spec` and returns (x_train, y_train, x_test, y_test).

    Labels come back as int32. Errors name `origin` (a file, or a TFDS dataset and directory).
    """
    expected = f"uint8 [N, {', '.join(map(str, spec.image_shape))}] (NHWC)"
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != spec.image_shape:
            raise errors.UserError(
                f"{origin}: x_{split} for dataset {spec.name!r} must be {expected}; "
                f"found {x.dtype} with shape {x.shape}."
            )
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
            raise errors.UserError(
                f"{origin}: y_{split} must be integer labels of shape ({len(x)},) to match "
                f"x_{split}; found {y.dtype} with shape {y.shape}."
            )
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise errors.UserError(
                f"{origin}: y_{split} for dataset {spec.name!r} must lie in "
                f"[0, {spec.num_classes}); found values in [{y.min()}, {y.max()}]."
            )
        out += [x, y.astype(np.int32)]
    return tuple(out)


def _load_tfds(spec: DatasetSpec, data_dir: str) -> tuple[np.ndarray, ...]:
    """Reads the train and test splits of a TFDS dataset prepared as array_record.

    `tfds.data_source` gives random access without TensorFlow (and is what
    `tfds.testing.mock_data` fakes). Examples are read one at a time: batched `__getitems__`
    is not supported by the mock.
    """
    name = spec.tfds_name
    if name == "tiny_imagenet":
        # Registers the builder (not in the TFDS catalogue). Imported here rather than at the top
        # so that `python -m bacon_jax.tiny_imagenet` does not find its module already imported
        # by the package (bacon_jax/__init__.py imports this module).
        from bacon_jax import tiny_imagenet  # pylint: disable=g-import-not-at-top
    try:
        sources = tfds.data_source(
            name, split=["train", "test"], data_dir=data_dir or None, download=False
        )
    except (NotImplementedError, FileNotFoundError, AssertionError, KeyError, ValueError):
        builder = tfds.builder(name, data_dir=data_dir or None)
        if not builder.is_prepared():
            if name == "tiny_imagenet":
                command = tiny_imagenet.prepare_command(builder.data_dir_root)
            else:
                command = (
                    f"tfds build {name} --data_dir={builder.data_dir_root} "
                    f"--file_format=array_record   (building needs TensorFlow; reading does not)"
                )
            raise errors.UserError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. "
                f"Prepare it with: {command}"
            ) from None  # the reader's own traceback says nothing more
        raise errors.UserError(
            f"TFDS dataset {name!r} at {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}, which has no random access; convert it with "
            f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
            f"--out_file_format=array_record`."
        ) from None
    arrays = {}
    for split, source in zip(("train", "test"), sources):
        examples = [source[i] for i in range(len(source))]
        arrays[f"x_{split}"] = np.stack([np.asarray(ex["image"]) for ex in examples])
        arrays[f"y_{split}"] = np.asarray([ex["label"] for ex in examples], np.int64)
    return _validated(spec, arrays, origin=f"TFDS {name!r} (data_dir={data_dir or 'default'})")


def normalize(
    x_uint8: jax.Array, mean: Sequence[float] | jax.Array, std: Sequence[float] | jax.Array
) -> jax.Array:
    """Scales uint8 images to [0, 1] and normalises each channel (SPEC §1.1).

    Args:
        x_uint8: [..., C] images with values in 0..255.
        mean: [C] per-channel mean.
        std: [C] per-channel standard deviation.

    Returns:
        float32 (x / 255 - mean) / std.
    """
    x = jnp.asarray(x_uint8, jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalize(
    x: jax.Array, mean: Sequence[float] | jax.Array, std: Sequence[float] | jax.Array
) -> jax.Array:
    """Inverts `normalize` up to the uint8 quantisation: values in [0, 1], not clipped.

    Args:
        x: [..., C] normalised images.
        mean: [C] per-channel mean.
        std: [C] per-channel standard deviation.

    Returns:
        float32 x * std + mean.
    """
    x = jnp.asarray(x, jnp.float32)
    return x * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def class_index(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists the dataset indices of each class, in increasing order (SPEC §1.3 `indices_class`).

    Args:
        labels: [N] integer labels in [0, num_classes).
        num_classes: Number of classes C.

    Returns:
        (index, counts): index is int32 [C, max count] whose row c starts with the counts[c]
        indices of class c, increasing, and is padded with 0; counts is int32 [C].

    Raises:
        ValueError: labels out of range, or a class without examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must be a vector of values in [0, {num_classes}).")
    counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"Classes without examples: {empty.tolist()}.")
    index = np.zeros((num_classes, counts.max()), np.int32)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for c in range(num_classes):
        index[c, : counts[c]] = order[starts[c] : starts[c] + counts[c]]
    return index, counts


def sample_class_indices(
    key: jax.Array, index_row: jax.Array, count: jax.Array, n: int
) -> tuple[jax.Array, jax.Array]:
    """Draws n of a class's examples without replacement (SPEC §1.3 `get_images(c, n)`).

    The valid slots hold a uniformly random subset of the first `count` entries of `index_row`
    in uniformly random order; when n >= count they hold the whole class. Vmappable over
    (key, index_row, count); `sample_class_indices_batch` draws for many classes at once.

    Args:
        key: PRNG key.
        index_row: [max_n] int32 dataset indices of the class, valid in the first `count`.
        count: Scalar (may be traced) number of valid entries, 1 <= count <= max_n.
        n: Static number of slots.

    Returns:
        (indices, mask): int32 [n] dataset indices and bool [n] marking the first min(n, count)
        slots as valid; invalid slots hold index 0.
    """
    indices, mask = sample_class_indices_batch(
        jnp.asarray(key)[None], jnp.asarray(index_row)[None], jnp.asarray(count)[None], n)
    return indices[0], mask[0]


def sample_class_indices_batch(
    keys: jax.Array, index_rows: jax.Array, counts: jax.Array, n: int
) -> tuple[jax.Array, jax.Array]:
    """`sample_class_indices` for a batch: keys [B], index_rows [B, max_n], counts [B].

    The same draws as one call per class; batched, the permutations' rare slow path (see
    `permutations`) is decided once for the batch instead of run for every row under `vmap`.
    """
    max_n = index_rows.shape[-1]

    def first_valid(perm, index_row, count):
        # A stable partition that moves the valid positions (< count) to the front: their
        # order stays uniformly random, and the count can be traced.
        valid = perm < count
        slot = jnp.where(valid, jnp.cumsum(valid) - 1, count + jnp.cumsum(~valid) - 1)
        perm = jnp.zeros_like(perm).at[slot].set(perm, unique_indices=True)
        positions = perm[: min(n, max_n)]
        if n > max_n:
            positions = jnp.pad(positions, (0, n - max_n))
        mask = jnp.arange(n) < jnp.minimum(n, count)
        return jnp.where(mask, index_row[positions], 0).astype(jnp.int32), mask

    return jax.vmap(first_valid)(permutations(keys, max_n), index_rows, counts)


def sample_uniform_indices(key: jax.Array, num_train: int, n: int) -> jax.Array:
    """Draws n distinct indices uniformly from [0, num_train) (SPEC §1.3 `get_images(None, n)`).

    Args:
        key: PRNG key.
        num_train: Static size of the training set.
        n: Static number of indices, at most num_train.

    Returns:
        int32 [n] distinct indices in random order.
    """
    if n > num_train:
        raise ValueError(f"Cannot draw {n} distinct indices from {num_train} examples.")
    return permutation(key, num_train)[:n]


def permutation(key: jax.Array, n: int) -> jax.Array:
    """`jax.random.permutation(key, n)` on XLA:CPU, as int32, computed with cheaper sorts.

    JAX shuffles by sorting the sequence by fresh random 32-bit keys, ceil(3 ln n / ln(2^32 - 1))
    times (two rounds for up to ~65k items). Ties between keys keep their earlier order (what
    XLA:CPU's sort does; here on every backend). Tests check equality with
    `jax.random.permutation`.

    Args:
        key: PRNG key.
        n: Static length.

    Returns:
        int32 [n], a uniformly random permutation of 0..n-1.
    """
    return permutations(jnp.asarray(key)[None], n)[0]


def permutations(keys: jax.Array, n: int) -> jax.Array:
    """`permutation` for a batch of keys [B]: int32 [B, n].

    Each round sorts the keys alone (XLA:CPU sorts one array ~8x faster than keys with a
    payload), ranks every key by binary search and scatters; tied keys (rare: ~n^2 / 2^33
    expected pairs per round) get their order among themselves from a small all-pairs count.
    Only when a round has more than `_TIE_CAP` tied keys in some row (probability ~0 for
    random keys) does the key-value sort run instead, for the whole batch.
    """
    rounds = int(np.ceil(3 * np.log(max(1, n)) / np.log(np.iinfo(np.uint32).max)))
    order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (keys.shape[0], n))
    for _ in range(rounds):
        split = jax.vmap(jax.random.split)(keys)
        keys, subkeys = split[:, 0], split[:, 1]
        bits = jax.vmap(lambda k: jax.random.bits(k, (n,), jnp.uint32))(subkeys)
        order = jnp.take_along_axis(order, _stable_argsort(bits), axis=1)
    return order


# Tied keys per row handled by the all-pairs count of `_stable_argsort`.
_TIE_CAP = 64


def _stable_argsort(keys: jax.Array, tie_cap: int = _TIE_CAP) -> jax.Array:
    """Stable argsort of each row of uint32 `keys` [B, n] (ties by index): int32 [B, n]."""
    n = keys.shape[-1]
    iota = jnp.arange(n, dtype=jnp.int32)

    def ranks(row):
        sorted_row = jnp.sort(row)
        first = jnp.searchsorted(sorted_row, row, method="scan_unrolled").astype(jnp.int32)
        tied = (first + 1 < n) & (sorted_row[jnp.minimum(first + 1, n - 1)] == row)
        members = jnp.nonzero(tied, size=tie_cap, fill_value=n)[0]  # ascending index order
        member_keys = row[jnp.minimum(members, n - 1)]
        earlier = jnp.arange(tie_cap)[None, :] < jnp.arange(tie_cap)[:, None]
        same = (member_keys[:, None] == member_keys[None, :]) & earlier & (members < n)[None, :]
        rank = first.at[members].add(jnp.sum(same, axis=1, dtype=jnp.int32), mode="drop")
        return rank, jnp.sum(tied) > tie_cap

    rank, overflow = jax.vmap(ranks)(keys)

    def by_rank(_):
        return jax.vmap(lambda r: jnp.zeros_like(iota).at[r].set(iota, unique_indices=True))(rank)

    def by_sort(_):
        return jax.vmap(lambda k: jax.lax.sort_key_val(k, iota, is_stable=True)[1])(keys)

    return jax.lax.cond(jnp.any(overflow), by_sort, by_rank, None)


def fit_zca(x_train_float_flat: np.ndarray, eps: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Fits ZCA whitening on the whole training set (SPEC §1.2).

    With the unbiased (N - 1) covariance Σ = U diag(s) Uᵀ, W = U diag((s + eps)^-1/2) Uᵀ.
    The flattening order of the pixels does not matter: the transform is equivariant to
    permuting dimensions, so NHWC flattening gives the reference's (NCHW) whitened images.

    Args:
        x_train_float_flat: [N, D] training images scaled to [0, 1], flattened.
        eps: Regulariser added to the eigenvalues.

    Returns:
        (mean, W): float32 [D] and [D, D].
    """
    x = np.asarray(x_train_float_flat)
    num, dim = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    # Accumulated in float64 chunks: exact enough, and the centred copy stays small.
    cov = np.zeros((dim, dim), np.float64)
    for start in range(0, num, 4096):
        chunk = x[start : start + 4096].astype(np.float64) - mean
        cov += chunk.T @ chunk
    cov /= num - 1
    s, u = np.linalg.eigh(cov)
    s = np.maximum(s, 0.0)
    w = (u * (s + eps) ** -0.5) @ u.T
    return mean.astype(np.float32), w.astype(np.float32)


def zca_of_training_set(x_train_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`fit_zca` on uint8 NHWC training images: the whitening of `dataset.zca=True`."""
    x = np.asarray(x_train_uint8)
    return fit_zca(x.reshape(x.shape[0], -1).astype(np.float32) / 255.0)


def apply_zca(x: jax.Array, mean: jax.Array, w: jax.Array) -> jax.Array:
    """Whitens images: (x - mean) · W on the flattened image, reshaped back.

    Args:
        x: [..., D] flat or [..., H, W, C] images in [0, 1], with H*W*C = D.
        mean: [D] mean from `fit_zca`.
        w: [D, D] whitening matrix from `fit_zca`.

    Returns:
        float32 whitened images of the shape of x.
    """
    x = jnp.asarray(x, jnp.float32)
    dim = w.shape[0]
    lead = x.shape[:-1] if x.shape[-1] == dim else x.shape[:-3]
    flat = x.reshape(lead + (dim,)) - jnp.asarray(mean, jnp.float32)
    # HIGHEST keeps accelerators from running this matmul in bf16.
    out = jnp.matmul(flat, jnp.asarray(w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(x.shape)
