"""Evaluate saved synthetic sets with the SPEC 8 protocol: a run's own, or any file or folder.

A run's sets on other architectures (SPEC 8, 2.3):

    python experiments/evaluate.py --config=configs/digits.py:ipc10 --workdir=/tmp/digits \
        --config.eval.models="('ConvNetW32','ConvNet','AlexNet','ResNet18BN')"
    python experiments/evaluate.py --config=configs/cifar10.py:ipc10 --workdir=/tmp/c10 \
        --eval_mode=M

Pass the --config that produced the run (its dataset, method, ipc and expansion are checked against
the workdir's config.json); `--config.eval.*` overrides change the evaluation only. Each
experiment's final set (`exp{e}/synthetic`) is expanded x4 for IDM/BACON and evaluated with
`eval.num_eval` fresh networks per architecture; one entry per architecture is appended to
`<workdir>/results.json` under "reevaluations".

A set from anywhere (an image folder, .npz, .safetensors, a PyTorch .pt or pickle):

    python experiments/evaluate.py --config=configs/cifar10.py:ipc10 \
        --set=res_DM_CIFAR10_ConvNet_10ipc.pt --output=/tmp/scores

The --config names the dataset and the evaluation; `--set_preprocessing` says what space the
tensors are in (normalized, the DM family's default; zca; pixels), `--set_expand` whether networks
train on the x4 expansion. Entries go to `<output>/results.json` under "imports".
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bacon_jax import errors, interop, models, reevaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset of the run, e.g. configs/mnist.py:ipc10.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (finished or partly finished).")
_EVAL_MODE = flags.DEFINE_enum(
    "eval_mode", None, [*models.EVAL_POOLS, "SS"],
    "Evaluate an eval-mode pool of SPEC 2.3 instead of config.eval.models (SS: config.model).",
)
_SET = flags.DEFINE_string(
    "set", None, "A synthetic set another program (or bacon_jax) wrote: an image folder (one "
    "sub-folder per class), .npz, .safetensors, .pt, or a pickle (with --allow_pickle).")
_SET_FORMAT = flags.DEFINE_enum("set_format", "auto", ["auto", *interop.FORMATS],
                                "Format of --set; auto: folders, then by file suffix.")
_SET_PREPROCESSING = flags.DEFINE_enum(
    "set_preprocessing", "auto", ["auto", *interop.PREPROCESSINGS],
    "Space of --set's images: normalized (the dataset's mean/std), zca (the dataset's ZCA, eps "
    "0.1, fitted on its training set), pixels ([0, 1]). auto: what a bacon_jax export records, "
    "pixels for image folders and uint8 arrays, else normalized.")
_SET_EXPAND = flags.DEFINE_enum(
    "set_expand", "auto", ["auto", "true", "false"],
    "Train on the x4 quadrant expansion of --set (IDM/BACON). auto: what a bacon_jax export "
    "records, else false.")
_SET_LABELS = flags.DEFINE_string(
    "set_labels", None, "Labels for a --set of images alone (e.g. DD-Ranking's labels.pt); "
    "without it such images are taken as class-major.")
_SET_METHOD = flags.DEFINE_string("set_method", "imported",
                                  "The method name the results table shows for --set.")
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, "Allow unpickling --set (IDM/BACON's .pkl): runs code from the file.")
_OUTPUT = flags.DEFINE_string("output", None, "With --set: directory of the results.json.")
flags.mark_flag_as_required("config")
flags.register_multi_flags_validator(
    ["workdir", "set", "output"],
    lambda f: (f["workdir"] is None) != (f["set"] is None) and (f["set"] is None) == (
        f["output"] is None),
    message="Give either --workdir (a run) or --set with --output (any saved set).")


def _auto(value):
    return None if value == "auto" else value


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.info("JAX %s, process %d/%d, local devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_devices())
    command = " ".join(sys.argv)
    if _SET.value is None:
        reevaluate.reevaluate(_CONFIG.value, _WORKDIR.value, eval_mode=_EVAL_MODE.value,
                              command=command)
        return
    expand = _auto(_SET_EXPAND.value)
    reevaluate.evaluate_external(
        _CONFIG.value, _SET.value, _OUTPUT.value, set_format=_SET_FORMAT.value,
        preprocessing=_auto(_SET_PREPROCESSING.value),
        expand=None if expand is None else expand == "true", allow_pickle=_ALLOW_PICKLE.value,
        labels_path=_SET_LABELS.value, method=_SET_METHOD.value, eval_mode=_EVAL_MODE.value,
        command=command)


if __name__ == "__main__":
    errors.run_script(main)
