"""Pretrain the CMI teachers (SPEC 7.1) on a dataset's real training set.

    python experiments/pretrain.py --config=configs/digits.py:ipc10 --workdir=/tmp/teachers/digits
    python experiments/pretrain.py --config=configs/cifar10.py:ipc10 --workdir=/tmp/teachers/cifar10 \
        --config.cmi.num_teachers=5

Then distill with `--config=configs/<dataset>.py:ipc10,cmi=on,cmi.teacher_dir=<workdir>` (the
setting's lambda; or `cmi.weight=<lambda>`).
Only `dataset`, `seed` and the `cmi` fields of the config matter here. Rerunning the same command
skips the teachers already written.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bacon_jax import errors, teacher
from bacon_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/mnist.py:ipc10.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory that receives teacher_0, teacher_1, ...")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.info("JAX %s, process %d/%d, local devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_devices())
    with workdir_lib.locked(_WORKDIR.value):  # one writer per teacher directory
        teacher.pretrain_teachers(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    errors.run_script(main)
