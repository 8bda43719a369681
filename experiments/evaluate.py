"""Re-evaluate a run's saved synthetic sets on other architectures (SPEC 8, 2.3).

    python experiments/evaluate.py --config=configs/digits.py:ipc10 --workdir=/tmp/digits \
        --config.eval.models="('ConvNetW32','ConvNet','AlexNet','ResNet18BN')"
    python experiments/evaluate.py --config=configs/cifar10.py:ipc10 --workdir=/tmp/c10 \
        --eval_mode=M

Pass the --config that produced the run (its dataset, method, ipc and expansion are checked against
the workdir's config.json); `--config.eval.*` overrides change the evaluation only. Each
experiment's final set (`exp{e}/synthetic`) is expanded x4 for IDM/BACON and evaluated with
`eval.num_eval` fresh networks per architecture; one entry per architecture is appended to
`<workdir>/results.json` under "reevaluations".
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bacon_jax import errors, models, reevaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset of the run, e.g. configs/mnist.py:ipc10.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (finished or partly finished).")
_EVAL_MODE = flags.DEFINE_enum(
    "eval_mode", None, [*models.EVAL_POOLS, "SS"],
    "Evaluate an eval-mode pool of SPEC 2.3 instead of config.eval.models (SS: config.model).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.info("JAX %s, process %d/%d, local devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_devices())
    reevaluate.reevaluate(_CONFIG.value, _WORKDIR.value, eval_mode=_EVAL_MODE.value,
                          command=" ".join(sys.argv))


if __name__ == "__main__":
    errors.run_script(main)
