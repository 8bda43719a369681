"""Synthetic sets across codebases: read what other programs wrote, write ours in their formats.

Reading (`read_sets`) takes one path the user named and returns the set(s) it holds as `RawSet`s:

* ``folder``: one sub-folder per class of PNG/JPEG images, as DD-Ranking, RDED and SRe2L write
  them (torchvision's ImageFolder layout). Sub-folders named by integers are those classes;
  otherwise classes are the sorted names, ImageFolder's rule. Images are uint8 pixels.
* ``npz``: our `exp{e}/synthetic.npz` (export.py; it records its preprocessing), or any `.npz`
  with `images` and `labels` arrays.
* ``safetensors``: ours (`exp{e}/synthetic.safetensors`, the card in its metadata), or any file
  with `images` and `labels` tensors.
* ``pt``: files `torch.save` wrote, loaded with `torch.load(weights_only=True)` (tensors, tuples,
  lists and dicts only; no code runs): the DC/DSA/DM `res_*.pt` (`{'data': [[images, labels],
  ...]}`, one set per experiment), an `(images, labels)` pair, our `synthetic.pt`, or a bare image
  tensor as DD-Ranking keeps them (labels from a second file, or class-major).
* ``pickle``: IDM/BACON's "best" `.pkl`, `pickle.dump((image_syn, label_syn))`. Unpickling runs
  code from the file, so it is read only with `allow_pickle=True` for the one file the user named.

`prepare` checks a raw set against the dataset (layout NCHW or NHWC, label range, every class
present; one-hot labels become integers, soft labels their argmax with a warning, since the SPEC 8
protocol trains on hard labels with cross-entropy) and maps its images into the space the
evaluation networks train in for the dataset config (`convert`): from `normalized` (the dataset's
mean/std, the DM family's space), `zca` (SPEC 1.2's whitening of the dataset's training set,
eps 0.1, refitted here) or `pixels` ([0, 1] floats; uint8 images are pixels too) to mean/std, or
to ZCA when the config has `dataset.zca`.

Writing: `write_image_folder` (denormalised PNGs, one sub-folder per class: lossy, uint8 and
clipped), `write_safetensors` (exact, NHWC float32 with the JSON `card` in its metadata) and
`write_torch` (NCHW tensors for DD-Ranking and the PyTorch codebases; needs torch).
"""

import dataclasses
import io
import json
import os
import pickle
import shutil
from typing import Any, Optional

from absl import logging
import numpy as np
from PIL import Image

from bacon_jax import data, errors

FORMATS = ("folder", "npz", "safetensors", "pt", "pickle")
PREPROCESSINGS = ("normalized", "zca", "pixels")
TORCH_EXTRA = 'pip install -e ".[torch]"'

_SUFFIXES = {".npz": "npz", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt",
             ".pkl": "pickle", ".pickle": "pickle"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CARD_KEY = "card"  # the safetensors metadata entry (and the .pt dict key) holding the card

# Written into every card: what the PNG folder loses (the safetensors and .pt files are exact).
FOLDER_NOTE = ("synthetic_images/ holds 8-bit PNGs: denormalised, clipped to [0, 1] and rounded "
               "to 1/255, so it is lossy; synthetic.safetensors and synthetic.pt hold the exact "
               "float32 images.")


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What one of our own exports records about its set (absent from other programs' files)."""

    preprocessing: data.Preprocessing
    dataset: str
    method: str
    expand: bool


@dataclasses.dataclass(frozen=True)
class RawSet:
    """One set as a file holds it, before the checks of `prepare`.

    Attributes:
        images: the image array as stored (NCHW or NHWC; float, or uint8 pixels).
        labels: the label array as stored (integers, one-hot or soft), or None for class-major.
        origin: where it came from, for messages and results (a path, `path data[1]`, ...).
        file_format: one of FORMATS.
        recorded: the preprocessing and description our own exports record, else None.
    """

    images: np.ndarray
    labels: Optional[np.ndarray]
    origin: str
    file_format: str
    recorded: Optional[Recorded] = None


@dataclasses.dataclass(frozen=True)
class PreparedSet:
    """A set ready for the evaluation protocol.

    Attributes:
        images: [N, H, W, C] float32 in the evaluation networks' input space, un-expanded.
        labels: [N] int32 in [0, num_classes).
        info: what was found and done (layout, preprocessing, labels, images per class), for the
            results file.
    """

    images: np.ndarray
    labels: np.ndarray
    info: dict


# --------------------------------------------------------------------------------------------
# Preprocessing spaces.


def pixel_space(num_channels):
    """The `data.Preprocessing` whose space is [0, 1] pixels (mean 0, std 1, no ZCA)."""
    return data.Preprocessing((0.0,) * num_channels, (1.0,) * num_channels)


def space_of(kind, dataset):
    """The `data.Preprocessing` of images given in `kind` for `dataset`.

    Args:
        kind: one of PREPROCESSINGS.
        dataset: the `data.Dataset` the images belong to (its training set fits the ZCA).

    Returns:
        `pixel_space`, the dataset's mean/std, or its SPEC 1.2 ZCA (fitted on the whole training
        set when the dataset was loaded without it).
    """
    spec = dataset.spec
    if kind == "pixels":
        return pixel_space(spec.image_shape[-1])
    if kind == "normalized":
        return data.Preprocessing(spec.mean, spec.std)
    if kind == "zca":
        zca = dataset.zca if dataset.zca is not None else data.zca_of_training_set(dataset.x_train)
        return data.Preprocessing(spec.mean, spec.std, *zca)
    raise errors.UserError(f"Unknown preprocessing {kind!r}; allowed: {', '.join(PREPROCESSINGS)}.")


def unclipped_pixels(images, preprocessing):
    """Inverts `preprocessing` exactly: network-space images to pixels, not clipped.

    Without ZCA x * std + mean; with ZCA x · pinv(W) + zca_mean on the NHWC-flattened image (the
    inverse of `data.apply_zca`). Computed in float64.
    """
    x = np.asarray(images, np.float64)
    if preprocessing.is_zca:
        matrix = np.asarray(preprocessing.zca_matrix, np.float64)
        flat = x.reshape(x.shape[:-3] + (matrix.shape[0],))
        flat = flat @ np.linalg.pinv(matrix) + np.asarray(preprocessing.zca_mean, np.float64)
        return flat.reshape(x.shape)
    return x * np.asarray(preprocessing.std, np.float64) + np.asarray(preprocessing.mean,
                                                                         np.float64)


def from_pixels(pixels, preprocessing):
    """Maps [0, 1] float pixels into `preprocessing`'s space (float64), as `data.preprocess` does
    for uint8 images after dividing by 255."""
    p = np.asarray(pixels, np.float64)
    if preprocessing.is_zca:
        matrix = np.asarray(preprocessing.zca_matrix, np.float64)
        flat = p.reshape(p.shape[:-3] + (matrix.shape[0],))
        flat = (flat - np.asarray(preprocessing.zca_mean, np.float64)) @ matrix
        return flat.reshape(p.shape)
    return (p - np.asarray(preprocessing.mean, np.float64)) / np.asarray(preprocessing.std,
                                                                          np.float64)


def same_space(a, b):
    """Whether two `data.Preprocessing`s map pixels identically (compared as stored, float32)."""
    if a.is_zca != b.is_zca:
        return False
    if a.is_zca:
        return (np.array_equal(np.float32(a.zca_mean), np.float32(b.zca_mean))
                and np.array_equal(np.float32(a.zca_matrix), np.float32(b.zca_matrix)))
    return (np.array_equal(np.float32(a.mean), np.float32(b.mean))
            and np.array_equal(np.float32(a.std), np.float32(b.std)))


def convert(images, source, target):
    """Images from `source`'s space to `target`'s (both `data.Preprocessing`), float32.

    The same space is returned unchanged (no round trip through pixels); otherwise through exact,
    unclipped pixels.
    """
    if same_space(source, target):
        return np.asarray(images, np.float32)
    return from_pixels(unclipped_pixels(images, source), target).astype(np.float32)


def to_uint8(pixels):
    """[0, 1] pixels to uint8 as torchvision's save_image rounds them: floor(255 x + 0.5), clipped."""
    return np.floor(np.clip(np.asarray(pixels), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Checks.


def to_nhwc(images, dataset_spec, origin):
    """(NHWC images, the layout found) for an NCHW or NHWC array (or NHW for one channel).

    Raises:
        ValueError: the shape fits none of the layouts of the dataset's image shape.
    """
    images = np.asarray(images)
    h, w, c = dataset_spec.image_shape
    tail = tuple(images.shape[1:])
    if images.ndim == 4 and tail == (h, w, c):
        return images, "NHWC"
    if images.ndim == 4 and tail == (c, h, w):
        return images.transpose(0, 2, 3, 1), "NCHW"
    if images.ndim == 3 and c == 1 and tail == (h, w):
        return images[..., None], "NHW"
    allowed = f"NCHW [N, {c}, {h}, {w}] or NHWC [N, {h}, {w}, {c}]"
    if c == 1:
        allowed += f" or [N, {h}, {w}]"
    raise errors.UserError(f"{origin}: images of shape {tuple(images.shape)} do not fit dataset "
                     f"{dataset_spec.name!r}; allowed: {allowed}.")


def hard_labels(labels, num_images, num_classes, origin):
    """(int32 labels [N], how they were read) from integer, one-hot or soft labels.

    Soft labels become their argmax (with a warning): the SPEC 8 protocol trains with hard-label
    cross-entropy, so a soft-label method's set is scored without its labels' information.

    Raises:
        ValueError: wrong shape, non-integral values, labels outside [0, num_classes), or a class
            without images.
    """
    if labels is None:  # DD-Ranking's default: class-major, the same count per class
        if num_images % num_classes:
            raise errors.UserError(f"{origin}: no labels, and {num_images} images cannot be split "
                             f"class-major into {num_classes} equal classes; give the labels.")
        labels, note = np.repeat(np.arange(num_classes), num_images // num_classes), "class-major"
    else:
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape == (num_images, num_classes):
            one_hot = bool(np.all((labels == 0) | (labels == 1)) and np.all(labels.sum(1) == 1))
            note = "one-hot" if one_hot else "argmax of soft labels"
            if not one_hot:
                logging.warning("%s: soft labels; the SPEC 8 protocol trains on hard labels, so "
                                "each image gets its argmax class.", origin)
            labels = labels.argmax(1)
        elif labels.ndim == 1 and labels.shape[0] == num_images:
            if not np.issubdtype(labels.dtype, np.integer):
                if not np.all(np.mod(labels, 1) == 0):
                    raise errors.UserError(f"{origin}: labels of dtype {labels.dtype} are not whole "
                                     "numbers; expected class indices.")
            note = "integer"
        else:
            raise errors.UserError(f"{origin}: labels of shape {labels.shape} do not fit {num_images} "
                             f"images; allowed: [{num_images}] class indices or "
                             f"[{num_images}, {num_classes}] one-hot or soft labels.")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise errors.UserError(f"{origin}: labels must lie in [0, {num_classes}); found values in "
                         f"[{labels.min()}, {labels.max()}].")
    missing = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
    if missing.size:
        raise errors.UserError(f"{origin}: no images of classes {missing.tolist()} (the dataset has "
                         f"{num_classes}).")
    return labels.astype(np.int32), note


def _pixel_values(images, origin):
    """uint8 images as [0, 1] floats; refuses other integer types (a range is then unknown)."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise errors.UserError(f"{origin}: images of dtype {images.dtype}; expected float images or "
                         "uint8 pixels.")
    return images


def prepare(raw, dataset, preprocessing=None):
    """Checks a `RawSet` against `dataset` and maps it into the evaluation networks' space.

    Args:
        raw: from `read_sets`.
        dataset: the `data.Dataset` of the config (its preprocessing is the target space).
        preprocessing: the space the stored images are in (one of PREPROCESSINGS), or None for
            what the file records (our exports), `pixels` for image folders and uint8 arrays,
            else `normalized` (the DM family's default).

    Returns:
        PreparedSet.

    Raises:
        ValueError: a statement that contradicts the file, or a failed check (see `to_nhwc`,
            `hard_labels`).
    """
    spec = dataset.spec
    if preprocessing is not None and preprocessing not in PREPROCESSINGS:
        raise errors.UserError(f"Unknown preprocessing {preprocessing!r}; allowed: "
                         f"{', '.join(PREPROCESSINGS)}.")
    if raw.recorded is not None:
        if raw.recorded.dataset != spec.name:
            raise errors.UserError(f"{raw.origin} holds a set of dataset {raw.recorded.dataset!r}, but "
                             f"the config is for {spec.name!r}; pass its config.")
        if preprocessing is not None:
            raise errors.UserError(f"{raw.origin} records its preprocessing; leave the preprocessing "
                             f"({preprocessing!r}) out.")
    uint8_input = raw.file_format == "folder" or np.asarray(raw.images).dtype == np.uint8
    if uint8_input and preprocessing not in (None, "pixels"):
        raise errors.UserError(f"{raw.origin} holds uint8 pixels (0-255), not {preprocessing!r} "
                         "images; leave the preprocessing out or say 'pixels'.")
    images, layout = to_nhwc(raw.images, spec, raw.origin)
    images = _pixel_values(images, raw.origin)
    labels, label_note = hard_labels(raw.labels, images.shape[0], spec.num_classes, raw.origin)
    if raw.recorded is not None:
        source, kind = raw.recorded.preprocessing, "recorded"
    else:
        kind = preprocessing or ("pixels" if uint8_input else "normalized")
        source = space_of(kind, dataset)
        if kind == "pixels" and images.size and images.max() > 2.0:
            raise errors.UserError(f"{raw.origin}: 'pixels' are [0, 1] floats, but values reach "
                             f"{images.max():.4g} (0-255 floats? divide them by 255).")
    images = convert(images, source, dataset.preprocessing)
    counts = np.bincount(labels, minlength=spec.num_classes)
    info = {
        "source": raw.origin,
        "format": raw.file_format,
        "layout": layout,
        "preprocessing": kind,
        "labels": label_note,
        "num_images": int(labels.size),
        "ipc": int(counts[0]) if np.all(counts == counts[0]) else None,
        "images_per_class": counts.tolist(),
    }
    if raw.recorded is not None:
        info["recorded"] = {"method": raw.recorded.method, "expand": raw.recorded.expand}
    return PreparedSet(images=images, labels=labels, info=info)


# --------------------------------------------------------------------------------------------
# Reading.


def detect_format(path):
    """The format of `path`: `folder` for a directory, else by suffix (see FORMATS)."""
    if os.path.isdir(path):
        return "folder"
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise errors.UserError(f"Cannot tell the format of {path} from its suffix {suffix!r}; name it "
                         f"(one of {', '.join(FORMATS)}); suffixes known: {sorted(_SUFFIXES)}.")
    return _SUFFIXES[suffix]


def import_torch(purpose):
    """The torch module, or a UserError saying how to install the optional extra."""
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise errors.UserError(
            f"{purpose} needs PyTorch, an optional extra: {TORCH_EXTRA}") from None
    return torch


def torch_available():
    """Whether torch can be imported (the `.pt` export is written only then)."""
    try:
        import_torch("")
    except errors.UserError:
        return False
    return True


def _numpy(value):
    """A torch tensor or array-like as a numpy array (floating tensors as float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _is_array(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _recorded_from_tensors(arrays, card, origin):
    """`Recorded` from our exports' mean/std/zca arrays and card."""
    try:
        preprocessing = data.Preprocessing(
            tuple(float(v) for v in np.asarray(arrays["mean"]).reshape(-1)),
            tuple(float(v) for v in np.asarray(arrays["std"]).reshape(-1)),
            arrays.get("zca_mean"), arrays.get("zca_matrix"))
        return Recorded(preprocessing, str(card["dataset"]), str(card["method"]),
                        bool(card["expand"]))
    except KeyError as error:
        raise errors.UserError(f"{origin}: a bacon_jax card without {error}; the file is damaged.") \
            from None


def _from_object(obj, origin, file_format, labels):
    """RawSets of an object `torch.load` or pickle returned."""
    if isinstance(obj, dict) and "data" in obj and isinstance(obj["data"], (list, tuple)):
        # DC/DSA/DM res_*.pt: one [images, labels] pair per experiment.
        sets = []
        for index, pair in enumerate(obj["data"]):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise errors.UserError(f"{origin}: data[{index}] is not an [images, labels] pair.")
            sets.append(RawSet(_numpy(pair[0]), _numpy(pair[1]), f"{origin} data[{index}]",
                               file_format))
        if not sets:
            raise errors.UserError(f"{origin}: 'data' holds no [images, labels] pair.")
        return sets
    if isinstance(obj, dict) and "images" in obj and "labels" in obj:
        arrays = {k: _numpy(v) for k, v in obj.items() if _is_array(v)}
        card = obj.get(_CARD_KEY)
        recorded = _recorded_from_tensors(arrays, card, origin) if card else None
        return [RawSet(arrays["images"], arrays["labels"], origin, file_format, recorded)]
    if isinstance(obj, (list, tuple)) and len(obj) == 2 and all(map(_is_array, obj)):
        return [RawSet(_numpy(obj[0]), _numpy(obj[1]), origin, file_format)]  # IDM/BACON
    if _is_array(obj):  # DD-Ranking's images.pt; labels from their own file or class-major
        return [RawSet(_numpy(obj), labels, origin, file_format)]
    found = f"a dict with keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
    raise errors.UserError(f"{origin}: found {found}; expected {{'data': [[images, labels], ...]}}, "
                     "{'images': ..., 'labels': ...}, an (images, labels) pair or an image tensor.")


def _read_folder(path, dataset_spec):
    """One RawSet of uint8 images from class sub-folders (see the module docstring)."""
    names = sorted(entry for entry in os.listdir(path)
                   if os.path.isdir(os.path.join(path, entry)) and not entry.startswith("."))
    if len(names) != dataset_spec.num_classes:
        raise errors.UserError(f"{path}: {len(names)} class sub-folders, but dataset "
                         f"{dataset_spec.name!r} has {dataset_spec.num_classes} classes.")
    if all(name.isdigit() for name in names):
        classes = [int(name) for name in names]
    else:  # torchvision ImageFolder: the sorted names are classes 0, 1, ...
        classes = list(range(len(names)))
    h, w, c = dataset_spec.image_shape
    mode = "L" if c == 1 else "RGB"
    images, labels = [], []
    for name, label in zip(names, classes):
        folder = os.path.join(path, name)
        for file_name in sorted(os.listdir(folder)):
            if not file_name.lower().endswith(_IMAGE_SUFFIXES):
                continue
            with Image.open(os.path.join(folder, file_name)) as picture:
                pixels = np.asarray(picture.convert(mode))
            if pixels.shape[:2] != (h, w):
                raise errors.UserError(f"{os.path.join(folder, file_name)} is {pixels.shape[1]}x"
                                 f"{pixels.shape[0]}; dataset {dataset_spec.name!r} images are "
                                 f"{w}x{h} (images are not resized).")
            images.append(pixels.reshape(h, w, c))
            labels.append(label)
    if not images:
        raise errors.UserError(f"{path}: no {'/'.join(_IMAGE_SUFFIXES)} images in its class folders.")
    return [RawSet(np.stack(images), np.asarray(labels), path, "folder")]


def _read_npz(path, labels):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    if "images" not in arrays:
        raise errors.UserError(f"{path}: no 'images' array; found {sorted(arrays)}.")
    recorded = None
    if "mean" in arrays and "dataset" in arrays:  # export.export_npz
        card = {k: arrays[k].item() for k in ("dataset", "method", "expand")}
        recorded = _recorded_from_tensors(arrays, card, path)
    return [RawSet(arrays["images"], arrays.get("labels", labels), path, "npz", recorded)]


def _read_safetensors(path, labels):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    import safetensors  # pylint: disable=g-import-not-at-top

    arrays = safetensors_numpy.load_file(path)
    with safetensors.safe_open(path, framework="np") as handle:
        metadata = handle.metadata() or {}
    if "images" not in arrays:
        raise errors.UserError(f"{path}: no 'images' tensor; found {sorted(arrays)}.")
    card = json.loads(metadata[_CARD_KEY]) if _CARD_KEY in metadata else None
    recorded = _recorded_from_tensors(arrays, card, path) if card else None
    return [RawSet(arrays["images"], arrays.get("labels", labels), path, "safetensors", recorded)]


def _read_pt(path, labels):
    torch = import_torch(f"Reading {path}")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise errors.UserError(
            f"{path} is not loadable without unpickling (torch.load(weights_only=True) refused "
            f"it: {str(error).splitlines()[0]}). If it is a pickle you trust (IDM/BACON's "
            "pickle.dump of (images, labels)), pass it with --set_format=pickle --allow_pickle: "
            "unpickling runs code from the file.") from None
    return _from_object(obj, path, "pt", labels)


class _CpuUnpickler(pickle.Unpickler):
    """pickle.Unpickler that puts torch storages on the CPU (a CUDA pickle loads without GPUs)."""

    def find_class(self, module, name):
        if module == "torch.storage" and name == "_load_from_bytes":
            torch = import_torch("Unpickling torch tensors")
            return lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)
        if module.split(".")[0] == "torch":
            import_torch("Unpickling torch tensors")
        return super().find_class(module, name)


def _read_pickle(path, labels, allow_pickle):
    if not allow_pickle:
        raise errors.UserError(f"{path} is a pickle: loading it runs code from the file. Pass "
                         "--allow_pickle (allow_pickle=True) if you trust it.")
    logging.warning("Unpickling %s: this runs code from the file; only do it for files you "
                    "trust.", path)
    with open(path, "rb") as f:
        obj = _CpuUnpickler(f).load()
    return _from_object(obj, path, "pickle", labels)


def read_labels(path):
    """A label array from `.npy`, `.npz` (its `labels`), `.pt` or `.safetensors` (`labels`)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".pt":
        return _numpy(import_torch(f"Reading {path}").load(path, weights_only=True,
                                                             map_location="cpu"))
    sets = {".npz": _read_npz, ".safetensors": _read_safetensors}
    if suffix not in sets:
        raise errors.UserError(f"Cannot read labels from {path}; allowed: .npy, .npz, .pt, "
                         ".safetensors.")
    raw = sets[suffix](path, None)[0]
    return raw.labels if raw.labels is not None else raw.images


def read_sets(path, dataset_spec, set_format="auto", *, labels_path=None, allow_pickle=False):
    """Reads the synthetic set(s) in `path` (see the module docstring for the formats).

    Args:
        path: the file or image folder the user named (nothing else is opened, except
            `labels_path`).
        dataset_spec: the `data.DatasetSpec` the set belongs to (folders need its image shape).
        set_format: one of FORMATS, or 'auto' (a directory is a folder; files by suffix).
        labels_path: labels for a file of images alone (DD-Ranking's `images.pt` + `labels.pt`);
            without it such images are taken as class-major.
        allow_pickle: allow unpickling `path` (the `pickle` format); never implied.

    Returns:
        A list of RawSet: one per experiment of a DC/DSA/DM `res_*.pt`, else one.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImportError: torch is needed and missing (the message names the extra).
        ValueError: unknown format, or a file that holds no set in a known layout.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise errors.UserError(f"{path} does not exist.")
    if set_format == "auto":
        set_format = detect_format(path)
    if set_format not in FORMATS:
        raise errors.UserError(f"Unknown set format {set_format!r}; allowed: auto, {', '.join(FORMATS)}.")
    if set_format == "folder":
        if not os.path.isdir(path):
            raise errors.UserError(f"{path} is not a directory (the folder format).")
        return _read_folder(path, dataset_spec)
    labels = read_labels(labels_path) if labels_path else None
    if set_format == "pickle":
        return _read_pickle(path, labels, allow_pickle)
    readers = {"npz": _read_npz, "safetensors": _read_safetensors, "pt": _read_pt}
    return readers[set_format](path, labels)


# --------------------------------------------------------------------------------------------
# Writing.


def preprocessing_card(preprocessing):
    """The card's description of a `data.Preprocessing` (its arrays travel as tensors)."""
    if preprocessing.is_zca:
        return {"kind": "zca", "eps": 0.1, "fit_on": "the dataset's whole training set (SPEC 1.2)",
                "pixels": "x / 255 in [0, 1], flattened NHWC, then (x - zca_mean) @ zca_matrix",
                "tensors": ["zca_mean", "zca_matrix"]}
    return {"kind": "normalized", "mean": [float(m) for m in preprocessing.mean],
            "std": [float(s) for s in preprocessing.std],
            "pixels": "x / 255 in [0, 1], then (x - mean) / std per channel"}


def card(*, dataset_spec, method, ipc, expand, preprocessing, num_images, config_hash):
    """The JSON card that travels with an exported set (safetensors metadata, synthetic.json).

    Args:
        dataset_spec: the set's `data.DatasetSpec`.
        method: the method that made it.
        ipc: stored images per class.
        expand: whether networks train on its x4 quadrant expansion (SPEC 4.3).
        preprocessing: the `data.Preprocessing` of its images' space.
        num_images: stored images.
        config_hash: `manifest.config_hash` of the run's config.

    Returns:
        A JSON-serialisable dict.
    """
    h, w, c = dataset_spec.image_shape
    return {
        "dataset": dataset_spec.name,
        "num_classes": int(dataset_spec.num_classes),
        # Label k is class k of bacon_jax.data's dataset; its image folder is class_folders[k].
        "class_order": list(range(dataset_spec.num_classes)),
        "class_folders": [class_folder_name(k, dataset_spec.num_classes)
                          for k in range(dataset_spec.num_classes)],
        "image_shape_hwc": [int(h), int(w), int(c)],
        "method": method,
        "ipc": int(ipc),
        "num_images": int(num_images),
        "order": "class-major: the ipc images of class 0, then class 1, ...",
        "expand": bool(expand),
        "expansion_factor": 4 if expand else 1,
        "preprocessing": preprocessing_card(preprocessing),
        "layouts": {"safetensors": "images [N, H, W, C] float32 (NHWC), labels [N] int32",
                    "pt": "images [N, C, H, W] float32 (NCHW), labels [N] int64",
                    "synthetic_images": "one sub-folder per class of 8-bit PNGs"},
        "lossy": FOLDER_NOTE,
        "config_hash": config_hash,
    }


def _replace_directory(tmp, directory):
    """Moves the finished `tmp` directory to `directory`, replacing an older one."""
    old = directory + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def class_folder_name(label, num_classes):
    """`007`: the zero-padded class index (at least 3 digits, ImageFolder sorts them in order)."""
    return f"{label:0{max(3, len(str(num_classes - 1)))}d}"


def write_image_folder(directory, images, labels, preprocessing, num_classes):
    """Writes a set as PNGs, one sub-folder per class (lossy: 8-bit, clipped; see FOLDER_NOTE).

    Images are denormalised as the PNG grid is (`unclipped_pixels`, then clipped and rounded by
    `to_uint8`), so reading the folder back as pixels gives them to within 1/510 where they were
    inside [0, 1].

    Args:
        directory: the folder to create (replaced if it exists).
        images: [N, H, W, C] images in `preprocessing`'s space.
        labels: [N] integer labels.
        preprocessing: the `data.Preprocessing` of the images.
        num_classes: number of classes (every class gets a folder).

    Returns:
        `directory`.
    """
    directory = os.path.abspath(directory)
    tmp = os.path.join(os.path.dirname(directory), ".tmp." + os.path.basename(directory))
    shutil.rmtree(tmp, ignore_errors=True)
    pixels = to_uint8(unclipped_pixels(images, preprocessing))
    labels = np.asarray(labels)
    for c in range(num_classes):
        os.makedirs(os.path.join(tmp, class_folder_name(c, num_classes)))
    for index, (picture, label) in enumerate(zip(pixels, labels)):
        name = os.path.join(tmp, class_folder_name(int(label), num_classes), f"{index:05d}.png")
        Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(name)
    _replace_directory(tmp, directory)
    return directory


def _preprocessing_tensors(preprocessing):
    tensors = {"mean": np.asarray(preprocessing.mean, np.float32),
               "std": np.asarray(preprocessing.std, np.float32)}
    if preprocessing.is_zca:
        tensors["zca_mean"] = np.asarray(preprocessing.zca_mean, np.float32)
        tensors["zca_matrix"] = np.asarray(preprocessing.zca_matrix, np.float32)
    return tensors


def _atomic(path, write):
    """Calls write(tmp_path), then renames the temporary file to `path`."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), ".tmp." + os.path.basename(path))
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(path, obj):
    """Writes `obj` as indented JSON, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    return _atomic(path, write)


def write_safetensors(path, images, labels, preprocessing, set_card):
    """Writes `images` (NHWC float32), `labels` (int32) and the preprocessing tensors, exactly,
    with `set_card` as JSON under the metadata key 'card'."""
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

    tensors = {"images": np.ascontiguousarray(images, np.float32),
               "labels": np.asarray(labels, np.int32), **_preprocessing_tensors(preprocessing)}
    return _atomic(path, lambda tmp: safetensors_numpy.save_file(
        tensors, tmp, metadata={_CARD_KEY: json.dumps(set_card)}))


def write_torch(path, images, labels, preprocessing, set_card):
    """Writes a `.pt` dict for DD-Ranking and PyTorch code (needs torch).

    Layout: {'images': float32 [N, C, H, W] (NCHW) in the networks' input space, 'labels': int64
    [N], 'mean', 'std' (and 'zca_mean', 'zca_matrix' under ZCA), 'card': the card as a dict}; it
    loads with `torch.load(path, weights_only=True)`. DD-Ranking:
    `s = torch.load(path); evaluator.compute_metrics(image_tensor=s['images'],
    hard_labels=s['labels'])`.
    """
    torch = import_torch(f"Writing {path}")
    # torch.tensor copies: the arrays may be read-only views (of device buffers).
    obj = {"images": torch.tensor(np.asarray(images, np.float32).transpose(0, 3, 1, 2)),
           "labels": torch.tensor(np.asarray(labels, np.int64)),
           **{k: torch.tensor(v) for k, v in _preprocessing_tensors(preprocessing).items()},
           _CARD_KEY: set_card}
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_card(path) -> dict[str, Any]:
    """The card of one of our `.safetensors` exports (the JSON in its metadata)."""
    import safetensors  # pylint: disable=g-import-not-at-top

    with safetensors.safe_open(os.fspath(path), framework="np") as handle:
        metadata = handle.metadata() or {}
    if _CARD_KEY not in metadata:
        raise errors.UserError(f"{path} has no bacon_jax card in its metadata.")
    return json.loads(metadata[_CARD_KEY])
