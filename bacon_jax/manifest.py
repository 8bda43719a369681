"""The run manifest: what produced a run, so that its numbers can be traced and compared.

`train.train_and_evaluate` writes `manifest.json` in the workdir (process 0, atomically) when the run
starts and after every experiment:

* `config_hash`: sha256 of the config's canonical JSON (sorted keys, no spaces); the exported
  sets' cards carry the same hash.
* `train_data_sha256`: sha256 of the loaded training set (uint8 images, then int32 labels, each
  prefixed by its shape), before any validation split; two runs with the same value saw the same
  training data.
* `seed`, and one entry per invocation of the run (a resumed run adds one): start and end time,
  the command, package versions, the git commit of the checkout the package runs from (`git
  describe`, dirty flag; "not a checkout" for an installed copy), device kind and count, process
  count, and the wall time in seconds per phase: `load` (data), then per experiment `init`
  (initial set or checkpoint restore; the coreset selection), `distill`, `evaluate` (every
  evaluation) and `export` (saved set and its exports).
"""

import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from bacon_jax import config_lib, interop

MANIFEST_NAME = "manifest.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "bacon_jax")


def config_hash(config):
    """sha256 (hex) of the config's canonical JSON: equal hashes mean equal configs."""
    text = json.dumps(config_lib.to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(dataset):
    """sha256 (hex) of a `data.Dataset`'s training images (uint8) and labels (int32)."""
    digest = hashlib.sha256()
    for array in (np.asarray(dataset.x_train, np.uint8), np.asarray(dataset.y_train, np.int32)):
        digest.update(repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def package_versions():
    """{distribution: version} of PACKAGES ("not installed" when absent)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _git(directory, *args):
    done = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                          timeout=30, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def source_revision(package_dir=None):
    """{'commit', 'describe', 'dirty'} of the git checkout bacon_jax is imported from.

    Args:
        package_dir: the package directory (default: this module's); its parent must be the top
            of the work tree.

    Returns:
        {'commit': 'not a checkout'} when the package does not sit at the top of a git work tree
        (an installed copy) or git is unavailable. `dirty` ignores untracked files.
    """
    package_dir = os.path.realpath(package_dir or os.path.dirname(os.path.abspath(__file__)))
    try:
        top = _git(package_dir, "rev-parse", "--show-toplevel")
        if top is None or os.path.dirname(package_dir) != os.path.realpath(top):
            return {"commit": "not a checkout"}
        status = _git(top, "status", "--porcelain", "--untracked-files=no")
        return {"commit": _git(top, "rev-parse", "HEAD"),
                "describe": _git(top, "describe", "--always", "--dirty"),
                "dirty": bool(status)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "not a checkout"}


class PhaseClock:
    """Wall time per phase: `lap(phase, exp)` adds the time since the previous lap to it."""

    def __init__(self):
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat()
        self.seconds = {}
        self._last = time.perf_counter()

    def lap(self, phase, exp=None):
        """Charges the time since the last lap (or the start) to `phase` (of experiment `exp`)."""
        now = time.perf_counter()
        bucket = self.seconds if exp is None else self.seconds.setdefault(f"exp{exp}", {})
        bucket[phase] = round(bucket.get(phase, 0.0) + now - self._last, 3)
        self._last = now


def invocation(clock, finished=False):
    """This process's entry of the manifest: when, what ran, on what, and how long each phase."""
    devices = jax.devices()
    return {
        "started": clock.started,
        "finished": (datetime.datetime.now(datetime.timezone.utc).isoformat() if finished
                     else None),
        "command": " ".join(sys.argv),
        "packages": package_versions(),
        "source": source_revision(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "wall_time_s": clock.seconds,
    }


def write_manifest(workdir, config, train_data_sha256, clock, finished=False):
    """Writes (process 0) or updates `workdir/manifest.json` with this invocation's entry.

    Entries of earlier invocations (a resumed run) are kept; this one replaces its own previous
    write, identified by its start time.

    Returns:
        The manifest dict.
    """
    path = os.path.join(workdir, MANIFEST_NAME)
    earlier = []
    if os.path.exists(path):
        with open(path) as f:
            earlier = [entry for entry in json.load(f).get("invocations", [])
                       if entry.get("started") != clock.started]
    manifest = {
        "config_hash": config_hash(config),
        "train_data_sha256": train_data_sha256,
        "seed": int(config.seed),
        "invocations": earlier + [invocation(clock, finished)],
    }
    if jax.process_index() == 0:
        interop.write_json(path, manifest)
    return manifest
