"""What a run leaves for people and other code: the synthetic set as `.npz`, PNG grids, TensorBoard.

`export_synthetic` also writes the final set in the formats other codebases read (an image folder,
safetensors with a JSON card, `.pt`; the writers are in interop.py).

* `export_npz` / `load_synthetic`: the final synthetic set in the networks' input space, un-expanded
  (SPEC 4.3), with the preprocessing needed to map it back to pixels (mean/std, or the ZCA mean and
  matrix, SPEC 1.1-1.2) and the `expand` flag that tells a loader to apply the x4 expansion before
  training on it. `load_synthetic` returns a `SyntheticSet` pytree.
* `to_pixels` / `save_grid_png`: denormalised images clipped to [0, 1], one row per class. Saved
  tensors stay in normalised space; pictures are the only place images are denormalised (quirk 31).
  Under ZCA the reference denormalises with mean/std, which is wrong (SPEC 1.2); here the whitening
  is inverted instead.
* `create_summary_writer`: per-iteration scalars and evaluation accuracies as TensorBoard event
  files, written with tensorboardX (clu's writers need TensorFlow, which bacon_jax does not use).
"""

import math
import os
from collections.abc import Mapping
from typing import Any, Optional

from absl import logging
import flax
import jax
import numpy as np
from PIL import Image

from bacon_jax import augment, data, interop, manifest

NPZ_NAME = "synthetic.npz"
PNG_NAME = "synthetic.png"
FOLDER_NAME = "synthetic_images"
SAFETENSORS_NAME = "synthetic.safetensors"
CARD_NAME = "synthetic.json"
TORCH_NAME = "synthetic.pt"

# Small images are enlarged (nearest neighbour) to at least this many pixels per side in grids.
_MIN_GRID_CELL = 32
# Gap between images in a grid, as torchvision.utils.save_image (the reference's PNGs) draws it.
_GRID_PADDING = 2


@flax.struct.dataclass
class SyntheticSet:
    """A saved synthetic set with what is needed to use it or look at it.

    Array fields are pytree leaves; the descriptive fields are static.

    Attributes:
        images: [N, H, W, C] float32 images in the networks' input space, un-expanded, class-major.
        labels: [N] int32 labels.
        mean: [C] per-channel mean of the mean/std normalisation.
        std: [C] per-channel standard deviation.
        zca_mean: [H*W*C] mean of the ZCA whitening (NHWC flattening), or None without ZCA.
        zca_matrix: [H*W*C, H*W*C] ZCA whitening matrix, or None without ZCA.
        dataset: dataset name (a key of `data.DATASETS`).
        method: distillation method that produced the set.
        ipc: stored images per class.
        expand: whether networks train on the x4 quadrant expansion (IDM/BACON, SPEC 4.3).
    """

    images: np.ndarray
    labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    zca_mean: Optional[np.ndarray] = None
    zca_matrix: Optional[np.ndarray] = None
    dataset: str = flax.struct.field(pytree_node=False, default="")
    method: str = flax.struct.field(pytree_node=False, default="")
    ipc: int = flax.struct.field(pytree_node=False, default=0)
    expand: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0]) // self.ipc

    @property
    def preprocessing(self) -> data.Preprocessing:
        """The `data.Preprocessing` that maps uint8 images of the dataset into the set's space.

        Host-side: its mean and std are static Python floats, so build it from a loaded (concrete)
        set, outside `jax.jit`. Inside a jitted function use `preprocess`.
        """
        return data.Preprocessing(
            tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std),
            self.zca_mean, self.zca_matrix,
        )

    def preprocess(self, x_uint8):
        """Maps uint8 images of the dataset into the set's space; works on traced sets in `jit`."""
        return data.preprocess(x_uint8, self.mean, self.std, self.zca_mean, self.zca_matrix)

    def training_set(self):
        """(images, labels) an evaluation network trains on: the x4 expansion when `expand`."""
        if self.expand:
            return augment.expand_quadrants(self.images, self.labels)
        return self.images, self.labels

    def pixels(self) -> np.ndarray:
        """The stored images as [0, 1] pixels (see `to_pixels`)."""
        return to_pixels(self.images, self)


def _preprocessing_arrays(preprocessing) -> dict[str, np.ndarray]:
    """mean/std (and zca_mean/zca_matrix under ZCA) of a Preprocessing, SyntheticSet or mapping."""
    if isinstance(preprocessing, Mapping):
        get = preprocessing.get
    else:
        get = lambda name: getattr(preprocessing, name, None)  # noqa: E731
    out = {
        "mean": np.asarray(get("mean"), np.float32).reshape(-1),
        "std": np.asarray(get("std"), np.float32).reshape(-1),
    }
    if get("zca_matrix") is not None:
        out["zca_mean"] = np.asarray(get("zca_mean"), np.float32).reshape(-1)
        out["zca_matrix"] = np.asarray(get("zca_matrix"), np.float32)
    return out


def export_npz(path, images, labels, preprocessing, *, dataset, method, ipc, expand):
    """Writes a synthetic set and its preprocessing to an `.npz` file (atomically).

    Args:
        path: output file (conventionally `exp{e}/synthetic.npz`).
        images: [N, H, W, C] images in model input space, un-expanded (what `distill.synthetic_set`
            returns).
        labels: [N] integer labels.
        preprocessing: the dataset's `data.Preprocessing` (or a mapping with `mean`, `std` and,
            under ZCA, `zca_mean` and `zca_matrix`).
        dataset: dataset name.
        method: method name.
        ipc: images per class.
        expand: whether training on the set uses the x4 expansion.

    Returns:
        The path written.
    """
    arrays = {
        "images": np.asarray(jax.device_get(images), np.float32),
        "labels": np.asarray(jax.device_get(labels), np.int32),
        **_preprocessing_arrays(preprocessing),
        "dataset": np.asarray(str(dataset)),
        "method": np.asarray(str(method)),
        "ipc": np.asarray(int(ipc), np.int32),
        "expand": np.asarray(bool(expand)),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # np.savez appends '.npz' to names without it, so the temporary name keeps the suffix.
    tmp = os.path.join(directory, ".tmp." + os.path.basename(path))
    if not tmp.endswith(".npz"):
        tmp += ".npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def _resolve_npz(path_or_workdir, exp):
    """The .npz to read: the file itself, an experiment directory's, or a workdir's `exp{exp}`."""
    path = os.fspath(path_or_workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist.")
    one_set = path if not os.path.isdir(path) else os.path.join(path, NPZ_NAME)
    if os.path.exists(one_set):
        if exp is not None:
            raise ValueError(f"exp={exp} picks one of a workdir's experiments, but {path} holds "
                             f"one set ({one_set}). Pass the workdir, or leave exp out.")
        return one_set
    candidate = os.path.join(path, f"exp{0 if exp is None else exp}", NPZ_NAME)
    if not os.path.exists(candidate):
        raise FileNotFoundError(
            f"No {NPZ_NAME} in {path}: looked for {one_set} and {candidate}. A run writes it when "
            f"an experiment finishes."
        )
    return candidate


def load_synthetic(path_or_workdir, exp=None) -> SyntheticSet:
    """Loads a synthetic set written by `export_npz`.

    Args:
        path_or_workdir: the `.npz` file, an experiment directory `exp{e}`, or a run's workdir
            (then `exp{exp}/synthetic.npz` is read).
        exp: which experiment to read from a workdir (default 0); an error with an experiment
            directory or a file.

    Returns:
        A `SyntheticSet` with numpy arrays. `.training_set()` applies the x4 expansion when the
        method needs it; `.pixels()` maps the images back to [0, 1].
    """
    path = _resolve_npz(path_or_workdir, exp)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return SyntheticSet(
        images=arrays["images"],
        labels=arrays["labels"],
        mean=arrays["mean"],
        std=arrays["std"],
        zca_mean=arrays.get("zca_mean"),
        zca_matrix=arrays.get("zca_matrix"),
        dataset=str(arrays["dataset"]),
        method=str(arrays["method"]),
        ipc=int(arrays["ipc"]),
        expand=bool(arrays["expand"]),
    )


def to_pixels(images, meta) -> np.ndarray:
    """Inverts the preprocessing: model-space images to [0, 1] pixels, clipped.

    Args:
        images: [..., H, W, C] images in model input space.
        meta: a `data.Preprocessing`, a `SyntheticSet`, or a mapping with `mean`, `std` and, under
            ZCA, `zca_mean` and `zca_matrix`.

    Returns:
        float32 numpy array of the shape of `images`, in [0, 1]. Without ZCA, x * std + mean; with
        ZCA, x · pinv(W) + zca_mean on the NHWC-flattened image (the inverse of `data.apply_zca`).
    """
    arrays = _preprocessing_arrays(meta)
    preprocessing = data.Preprocessing(tuple(arrays["mean"]), tuple(arrays["std"]),
                                       arrays.get("zca_mean"), arrays.get("zca_matrix"))
    x = interop.unclipped_pixels(jax.device_get(images), preprocessing)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def grid(pixels, ipc, num_classes, min_cell=_MIN_GRID_CELL, padding=_GRID_PADDING) -> np.ndarray:
    """Tiles class-major [0, 1] images into one uint8 image, one row per class.

    Args:
        pixels: [num_classes * ipc, H, W, C] images in [0, 1], class-major.
        ipc: images per class (columns).
        num_classes: classes (rows).
        min_cell: images smaller than this are enlarged by an integer factor (nearest neighbour).
        padding: black pixels between and around images.

    Returns:
        uint8 [rows, cols, C] with rows = num_classes * (H * s + padding) + padding and
        cols = ipc * (W * s + padding) + padding, s = ceil(min_cell / min(H, W)) (at least 1).
    """
    pixels = np.asarray(pixels)
    n, h, w, c = pixels.shape
    if n != ipc * num_classes:
        raise ValueError(f"{n} images cannot fill a grid of {num_classes} classes x {ipc} ipc.")
    scale = max(1, math.ceil(min_cell / min(h, w)))
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    cells = interop.to_uint8(pixels)
    cells = cells.reshape(num_classes, ipc, h, w, c)
    out = np.zeros(
        (num_classes * (h + padding) + padding, ipc * (w + padding) + padding, c), np.uint8
    )
    for row in range(num_classes):
        for col in range(ipc):
            top, left = padding + row * (h + padding), padding + col * (w + padding)
            out[top:top + h, left:left + w] = cells[row, col]
    return out


def save_grid_png(path, images, meta, ipc, num_classes):
    """Writes the synthetic images as a PNG grid: one row per class, denormalised and clipped.

    Args:
        path: output `.png` file.
        images: [num_classes * ipc, H, W, C] class-major images in model input space (un-expanded).
        meta: preprocessing, as for `to_pixels`.
        ipc: images per class.
        num_classes: number of classes.

    Returns:
        The uint8 grid that was written ([rows, cols, C]).
    """
    tiled = grid(to_pixels(images, meta), ipc, num_classes)
    picture = Image.fromarray(tiled[..., 0] if tiled.shape[-1] == 1 else tiled)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp." + os.path.basename(path))
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)
    return tiled


def export_synthetic(exp_dir, images, labels, preprocessing, config):
    """Writes an experiment's final set in every format other code reads, in `exp_dir`.

    * `synthetic.npz` (`load_synthetic`) and the grid `synthetic.png`;
    * `synthetic_images/`: one sub-folder per class (`000/`, `001/`, ...) of denormalised PNGs
      (lossy: 8-bit and clipped), what DD-Ranking, RDED or SRe2L read as an ImageFolder;
    * `synthetic.safetensors` (exact, NHWC float32, the preprocessing tensors, the card in its
      metadata) and the card alone as `synthetic.json` (interop.card: dataset, class order, IPC,
      method, preprocessing, expansion factor, config hash);
    * `synthetic.pt` when torch is importable: NCHW tensors for DD-Ranking and PyTorch code
      (interop.write_torch).

    Args:
        exp_dir: the experiment's directory.
        images: [C * ipc, H, W, C] un-expanded images in model input space.
        labels: [C * ipc] labels, class-major.
        preprocessing: the dataset's `data.Preprocessing`.
        config: the run's ConfigDict (dataset.name, method, ipc, expand).

    Returns:
        The path of the `.npz` file.
    """
    ipc = int(config.ipc)
    images = np.asarray(jax.device_get(images), np.float32)
    labels = np.asarray(jax.device_get(labels), np.int32)
    num_classes = labels.shape[0] // ipc
    path = export_npz(
        os.path.join(exp_dir, NPZ_NAME), images, labels, preprocessing,
        dataset=config.dataset.name, method=config.method, ipc=ipc, expand=bool(config.expand),
    )
    save_grid_png(os.path.join(exp_dir, PNG_NAME), images, preprocessing, ipc, num_classes)
    set_card = interop.card(
        dataset_spec=data.DATASETS[config.dataset.name], method=config.method, ipc=ipc,
        expand=bool(config.expand), preprocessing=preprocessing, num_images=labels.shape[0],
        config_hash=manifest.config_hash(config))
    interop.write_image_folder(os.path.join(exp_dir, FOLDER_NAME), images, labels, preprocessing,
                               num_classes)
    interop.write_safetensors(os.path.join(exp_dir, SAFETENSORS_NAME), images, labels,
                              preprocessing, set_card)
    interop.write_json(os.path.join(exp_dir, CARD_NAME), set_card)
    if interop.torch_available():
        interop.write_torch(os.path.join(exp_dir, TORCH_NAME), images, labels, preprocessing,
                            set_card)
    return path


class SummaryWriter:
    """Scalars to TensorBoard event files in `logdir`; a no-op when `logdir` is None.

    Mirrors the part of clu's `MetricWriter` interface that bacon_jax uses (`write_scalars`,
    `flush`, `close`), so swapping in clu later is a one-line change.
    """

    def __init__(self, logdir=None):
        self._writer = None
        if logdir is None:
            return
        try:
            import tensorboardX  # pylint: disable=g-import-not-at-top
        except ImportError:
            logging.warning("tensorboardX is not installed; no TensorBoard event files in %s "
                            "(pip install tensorboardX).", logdir)
            return
        self._writer = tensorboardX.SummaryWriter(os.fspath(logdir))

    @property
    def active(self) -> bool:
        return self._writer is not None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), int(step))

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def create_summary_writer(logdir, *, just_logging=False) -> SummaryWriter:
    """A TensorBoard writer for `logdir`, or a no-op one with `just_logging` (non-zero processes).

    Same call shape as `clu.metric_writers.create_default_writer(logdir, just_logging=...)`.
    """
    return SummaryWriter(None if just_logging else logdir)
