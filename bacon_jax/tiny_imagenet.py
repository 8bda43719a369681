"""A TFDS builder for Tiny ImageNet (`tiny-imagenet-200.zip`), preparable without TensorFlow.

Tiny ImageNet is not in the TFDS catalogue. This module registers the builder `tiny_imagenet`
(SPEC §1.1: 200 classes, 100,000 training images of 64x64, and the 10,000-image `val` set used as
the test split) so that `bacon_jax.data` reads it through `tfds.data_source` like the other
datasets. Prepare it once with

    python -m bacon_jax.tiny_imagenet --zip=/path/to/tiny-imagenet-200.zip --data_dir=DATA_DIR

(or `--download` instead of `--zip` to fetch the archive from its official address), then set
`config.dataset.data_dir=DATA_DIR`.

Why the images are raw arrays: TFDS's `Image` feature encodes numpy images to PNG/JPEG with
TensorFlow, and we do not require TensorFlow. The builder decodes each JPEG with Pillow (as
torchvision's loaders do, converting the few grayscale images to RGB) and stores it as a
`Tensor(shape=(64, 64, 3), dtype=uint8)`, written as `array_record` — the random-access format
`tfds.data_source` reads, again without TensorFlow. The cost is disk: about 1.3 GB instead of the
archive's 250 MB.

Labels: class `k` is the k-th line of `wnids.txt` (the archive's order, not sorted); the
validation labels come from `val/val_annotations.txt`. The list of wnids is kept in the dataset's
metadata (`info.metadata['wnids']`). An archive with fewer classes (the tests' fake one) goes
through the same code and uses the first labels of the 200.

Only numpy, tensorflow_datasets (and Pillow, when decoding) are imported: importing this module,
which registers the builder and which `bacon_jax.data` does when it loads `tiny_imagenet`, is cheap.
"""

import argparse
import io
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_CLASSES = 200
IMAGE_SHAPE = (64, 64, 3)
ARCHIVE_NAME = "tiny-imagenet-200.zip"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# The folder that the archive unpacks to, also accepted in the manual directory.
_ROOT = "tiny-imagenet-200"
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

_CITATION = """\
@article{le2015tiny,
  title={Tiny ImageNet Visual Recognition Challenge},
  author={Le, Ya and Yang, Xuan},
  journal={CS 231N},
  year={2015}
}
"""


def prepare_command(data_dir: str) -> str:
    """The shell command that prepares Tiny ImageNet in `data_dir` (for error messages)."""
    return (
        f"python -m bacon_jax.tiny_imagenet --zip=/path/to/{ARCHIVE_NAME} "
        f"--data_dir={data_dir}   (or --download instead of --zip to fetch {URL})"
    )


class _Archive:
    """Read access to the archive's files, from the zip or from its extracted folder.

    Paths are relative to the archive's root folder, with '/' separators, e.g.
    'val/val_annotations.txt'.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._zip = None
        if os.path.isdir(self.path):
            names = []
            for dirpath, _, filenames in os.walk(self.path):
                rel = os.path.relpath(dirpath, self.path)
                prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                names += [prefix + filename for filename in filenames]
        else:
            self._zip = zipfile.ZipFile(self.path)
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        # The root is the folder holding wnids.txt: the archive's top folder, or none.
        roots = [n[: -len("wnids.txt")] for n in names if n.rsplit("/", 1)[-1] == "wnids.txt"]
        if len(roots) != 1:
            raise ValueError(
                f"{self.path}: expected exactly one wnids.txt (the layout of {ARCHIVE_NAME}); "
                f"found {len(roots)}."
            )
        self._prefix = roots[0]
        self.names = sorted(n[len(self._prefix):] for n in names if n.startswith(self._prefix))

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self._prefix + name)
        with open(os.path.join(self.path, self._prefix, name), "rb") as f:
            return f.read()

    def read_text(self, name: str) -> str:
        try:
            return self.read(name).decode("utf-8")
        except KeyError as e:  # zipfile's "no such member"
            raise FileNotFoundError(f"{self.path}: missing {name}.") from e


def _read_wnids(archive: _Archive) -> list[str]:
    wnids = [line.strip() for line in archive.read_text("wnids.txt").splitlines() if line.strip()]
    if not wnids or len(wnids) > NUM_CLASSES or len(set(wnids)) != len(wnids):
        raise ValueError(
            f"{archive.path}: wnids.txt must list between 1 and {NUM_CLASSES} distinct class ids; "
            f"found {len(wnids)} ({len(set(wnids))} distinct)."
        )
    return wnids


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def _train_files(archive: _Archive, wnids: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every training image, class by class in wnids order, sorted in a class."""
    by_wnid = {wnid: [] for wnid in wnids}
    for name in archive.names:  # sorted
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and _is_image(name):
            if parts[1] in by_wnid:
                by_wnid[parts[1]].append(name)
    files = []
    for label, wnid in enumerate(wnids):
        if not by_wnid[wnid]:
            raise ValueError(
                f"{archive.path}: no training images under train/{wnid}/images/ for {wnid}."
            )
        files += [(name, label) for name in by_wnid[wnid]]
    return files


def _val_files(archive: _Archive, wnids: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every validation image, labels from val/val_annotations.txt."""
    label_of = {wnid: k for k, wnid in enumerate(wnids)}
    files = []
    lines = archive.read_text("val/val_annotations.txt").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < 2 or fields[1] not in label_of:
            raise ValueError(
                f"{archive.path}: val/val_annotations.txt line {number} {line!r} must start with "
                f"an image name and a wnid listed in wnids.txt."
            )
        files.append((f"val/images/{fields[0]}", label_of[fields[1]]))
    if not files:
        raise ValueError(f"{archive.path}: val/val_annotations.txt lists no images.")
    return files


def _decode(data: bytes, origin: str) -> np.ndarray:
    """Decodes one image to uint8 RGB [64, 64, 3] with Pillow (grayscale images become RGB)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if array.shape != IMAGE_SHAPE:
        raise ValueError(f"{origin}: expected a {IMAGE_SHAPE} image, found shape {array.shape}.")
    return array


class TinyImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """Tiny ImageNet 200: train and the labelled val set (as `test`), images as uint8 arrays.

    The registered name is `tiny_imagenet`. When this file runs as a script (`python -m`), the
    `__main__` copy of the class is not registered; `main` uses the one in `bacon_jax`.
    """

    # TFDS derives this through `importlib_resources`, which it installs only for Python < 3.9
    # (without it, preparing a builder defined in a package fails); the answer is this file.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: raw uint8 images, val used as test."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {URL} (about 250 MB) and place {ARCHIVE_NAME} (or the folder {_ROOT}/ it extracts
    to) in the manual directory (`--manual_dir`, by default <data_dir>/downloads/manual/).
    Simplest: python -m bacon_jax.tiny_imagenet --zip=/path/to/{ARCHIVE_NAME} --data_dir=DATA_DIR
    """

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=...) rather than dataset_info_from_configs: the latter looks for
        # metadata files next to the module, which a builder inside a package does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Tiny ImageNet: 200 ImageNet classes at 64x64, 500 training and 50 validation "
                "images per class. The labelled validation set is the test split. Images are "
                "stored as raw uint8 arrays (decoded with Pillow, converted to RGB); class k is "
                "line k of wnids.txt, listed in metadata['wnids']."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=IMAGE_SHAPE, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                    ),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        archive = _Archive(self._manual_archive(dl_manager) or dl_manager.download(URL))
        wnids = _read_wnids(archive)
        self.info.metadata["wnids"] = wnids
        return {
            "train": self._generate_examples(archive, _train_files(archive, wnids)),
            "test": self._generate_examples(archive, _val_files(archive, wnids)),
        }

    @staticmethod
    def _manual_archive(dl_manager: tfds.download.DownloadManager) -> str | None:
        """The zip (or extracted folder) in the manual directory, or None to download it."""
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # no manual directory, or an empty one
            return None
        for name in (ARCHIVE_NAME, _ROOT):
            if (manual_dir / name).exists():
                return os.fspath(manual_dir / name)
        return None

    def _generate_examples(
        self, archive: _Archive, files: list[tuple[str, int]]
    ) -> Iterator[tuple[str, dict]]:
        for name, label in files:
            try:
                data = archive.read(name)
            except (KeyError, FileNotFoundError) as e:
                raise FileNotFoundError(f"{archive.path}: missing image {name}.") from e
            image = _decode(data, f"{archive.path}:{name}")
            # The archive path is a stable, unique key, so the shuffled order TFDS writes is
            # the same on every preparation.
            yield name, {"image": image, "label": label, "file_name": name.rsplit("/", 1)[-1]}


def prepare(
    data_dir: str, archive: str | None = None, download: bool = False
) -> tfds.core.DatasetBuilder:
    """Prepares `tiny_imagenet` in `data_dir` as array_record, from a zip, a folder or the URL.

    Args:
        data_dir: TFDS data directory (what `config.dataset.data_dir` will point at).
        archive: path of `tiny-imagenet-200.zip` (any file name) or of its extracted folder.
        download: fetch the archive from `URL` instead; exactly one of `archive` / `download`.

    Returns:
        The prepared builder.
    """
    if (archive is None) == (not download):
        raise ValueError("Give exactly one of an archive path or download=True.")
    # The registered class, also when this file runs as `python -m bacon_jax.tiny_imagenet`.
    from bacon_jax import tiny_imagenet  # pylint: disable=g-import-not-at-top,import-self

    builder = tiny_imagenet.TinyImagenet(data_dir=data_dir, file_format="array_record")
    with tempfile.TemporaryDirectory() as manual_dir:
        if archive is not None:
            archive = os.path.abspath(archive)
            if not os.path.exists(archive):
                raise FileNotFoundError(f"No Tiny ImageNet archive at {archive}.")
            # The builder looks for the official names in the manual directory; a link lets the
            # archive keep any name and place.
            link = ARCHIVE_NAME if os.path.isfile(archive) else _ROOT
            os.symlink(archive, os.path.join(manual_dir, link))
        config = tfds.download.DownloadConfig(
            manual_dir=manual_dir if archive is not None else None, try_download_gcs=False
        )
        builder.download_and_prepare(download_config=config)
    return builder


def main(argv: list[str] | None = None) -> None:
    """Command line: prepare Tiny ImageNet in a TFDS data directory."""
    parser = argparse.ArgumentParser(
        prog="python -m bacon_jax.tiny_imagenet",
        description="Prepare Tiny ImageNet as the TFDS dataset `tiny_imagenet` (array_record).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--zip", help=f"path of {ARCHIVE_NAME} (or of its extracted folder)")
    source.add_argument("--download", action="store_true", help=f"download it from {URL}")
    parser.add_argument(
        "--data_dir",
        default=os.path.expanduser("~/tensorflow_datasets"),
        help="TFDS data directory; set config.dataset.data_dir to it (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    builder = prepare(args.data_dir, archive=args.zip, download=args.download)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"Prepared tiny_imagenet in {builder.data_dir}: {splits}.")
    print(f"Use it with --config.dataset.data_dir={args.data_dir} (configs/tiny_imagenet.py).")


if __name__ == "__main__":
    main(sys.argv[1:])
