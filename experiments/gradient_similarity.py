"""How alike are the per-image gradients of one class? A diagnostic for IDM/BACON runs.

    python experiments/gradient_similarity.py --config=configs/digits.py:ipc10,method=bacon \
        --workdir=/tmp/runs/digits_ipc10_bacon_s2 --classes=0,3 --nets=3

Restores the latest checkpoint of experiment 0 of a run, takes the snapshot of its synthetic set
(what the reference holds) and, for the first `--nets` pool nets and each class in `--classes`,
computes the class objective's gradient with respect to the class's stored images twice: the
matching term alone (CE multiplier 0) and the CE term alone (multiplier 1, minus the former). For
each it prints the mean pairwise cosine similarity of the ipc per-image gradients and their RMS.
High similarity with a large CE RMS (times the run's multiplier, `ce_weight` x accuracy %) means
the images of a class move together toward one pattern.
"""

import dataclasses

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from bacon_jax import checkpointing, config_lib, data, distill, models, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory.")
_CLASSES = flags.DEFINE_list("classes", ["0"], "Classes to inspect.")
_NETS = flags.DEFINE_integer("nets", 3, "Pool slots 0..nets-1 to use as matching nets.")
flags.mark_flags_as_required(["config", "workdir"])


def mean_pairwise_cosine(grads):
    """Mean cosine similarity over distinct pairs of rows of `grads` [n, ...] (n >= 2)."""
    flat = grads.reshape(grads.shape[0], -1)
    unit = flat / jnp.linalg.norm(flat, axis=1, keepdims=True)
    n = unit.shape[0]
    return float((jnp.sum(unit @ unit.T) - n) / (n * n - n))


def main(argv):
    del argv
    config = _CONFIG.value
    if config.method not in ("idm", "bacon") or config.ipc < 2:
        raise app.UsageError("Needs an IDM/BACON run with ipc >= 2 (a pool and several images).")
    dataset = data.load_dataset(config.dataset)
    real = distill.real_data_from_dataset(dataset)
    spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size,
                                    mesh=train.make_mesh(config))
    model = models.get_model(config.model, dataset.num_classes, dataset.image_shape)
    template = distill.init_state(jax.random.PRNGKey(0), real, model, spec)
    manager = checkpointing.make_manager(f"{_WORKDIR.value}/exp0/checkpoints")
    state = checkpointing.restore_latest(manager, template,
                                         checkpointing.state_metadata(config, dataset.spec),
                                         max_step=int(config.iterations))
    if state is None:
        raise app.UsageError(f"No checkpoint under {_WORKDIR.value}/exp0/checkpoints.")
    images, _ = distill.synthetic_set(state, spec)
    with_ce = dataclasses.replace(spec, syn_ce=True)
    print(f"iteration {int(state.step)}; columns: pool slot, class, term, mean pairwise cosine "
          f"of the {spec.ipc} per-image gradients, gradient RMS")
    for slot in range(min(_NETS.value, int(state.pool.size))):
        params = jax.tree.map(lambda stack, s=slot: stack[s], state.pool.params)
        for c in map(int, _CLASSES.value):
            class_images = images[c * spec.ipc:(c + 1) * spec.ipc]
            key = jax.random.fold_in(jax.random.PRNGKey(slot), c)
            grad = lambda multiplier: distill.class_objective(
                class_images, jnp.int32(c), key, params, jnp.float32(multiplier), real, model,
                with_ce)[0]
            match = grad(0.0)
            ce = grad(1.0) - match
            for name, g in (("match", match), ("ce (per unit multiplier)", ce)):
                rms = float(jnp.sqrt(jnp.mean(jnp.square(g))))
                print(f"{slot}\t{c}\t{name}\t{mean_pairwise_cosine(g):.3f}\t{rms:.4g}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
