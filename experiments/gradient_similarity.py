"""How alike are the per-image gradients of one class, and how large is the CE term against the
matching term? A diagnostic for IDM/BACON runs.

From a run's checkpoint (the pool nets and synthetic set it holds):

    python experiments/gradient_similarity.py --config=configs/digits.py:ipc10,method=bacon \
        --workdir=/tmp/runs/digits_ipc10_bacon_s2 --classes=0,3 --nets=3

From the initial set and one fresh net trained with the pool recipe (SPEC 5.8) for each number of
steps in `--fresh_net_steps` (no run needed; the meter counts every step, as between two resets):

    python experiments/gradient_similarity.py --config=configs/mnist.py:ipc10,model=ConvNetW32 \
        --fresh_net_steps=10,100 --classes=0,1,2,3,4,5,6,7,8,9

For each net and class it computes the class objective's gradient with respect to the class's
stored images twice: the matching term alone (CE multiplier 0) and the CE term alone (multiplier 1,
minus the former). It prints each term's mean pairwise cosine similarity over the ipc per-image
gradients and its RMS, the net's CE multiplier (`ce_weight` x meter accuracy in percent) and the
ratio multiplier x CE RMS / matching RMS: above 1 the CE term dominates the class's update. High
similarity with a dominant CE term means the images of a class move together toward one pattern.
"""

import dataclasses
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from bacon_jax import checkpointing, config_lib, data, distill, models, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (checkpoint mode).")
_CLASSES = flags.DEFINE_list("classes", ["0"], "Classes to inspect.")
_NETS = flags.DEFINE_integer("nets", 3, "Pool slots 0..nets-1 to use as matching nets.")
_FRESH_NET_STEPS = flags.DEFINE_list(
    "fresh_net_steps", [],
    "Instead of a checkpoint: train one fresh net for each of these cumulative step counts "
    "(multiples of model_train_steps) and inspect the initial set with it.")
flags.mark_flags_as_required(["config"])


def mean_pairwise_cosine(grads):
    """Mean cosine similarity over distinct pairs of rows of `grads` [n, ...] (n >= 2)."""
    flat = grads.reshape(grads.shape[0], -1)
    unit = flat / jnp.linalg.norm(flat, axis=1, keepdims=True)
    n = unit.shape[0]
    return float((jnp.sum(unit @ unit.T) - n) / (n * n - n))


def rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def term_gradients(class_images, class_id, key, params, real, model, spec):
    """The matching term's and the CE term's (per unit multiplier) image gradients of one class.

    Both come from `distill.class_objective` with the same real batch and DSA draw, so their sum
    with multiplier m is exactly the gradient the engine applies for a net whose multiplier is m.
    """
    with_ce = dataclasses.replace(spec, syn_ce=True)
    class_id = jnp.asarray(class_id, jnp.int32)
    grad = lambda multiplier: distill.class_objective(
        class_images, class_id, key, params, jnp.float32(multiplier), real, model, with_ce)[0]
    match = grad(0.0)
    return match, grad(1.0) - match


# Compiled once per (model, spec), whichever call and round asks for it.
_train_pool = jax.jit(distill.train_pool, static_argnames=("model", "spec"))


def train_fresh_net(pool, key, num_rounds, real, model, spec):
    """Trains pool slot 0 alone for `num_rounds` x `spec.model_train_steps` pool-recipe steps.

    Each round is one `distill.train_pool` call on a one-net view of the pool, so the net gets
    exactly the engine's training and its meter counts every step. Other slots are untouched.
    """
    one_net = dataclasses.replace(spec, fetch_net_num=1)
    size = pool.size
    for r in range(num_rounds):
        pool = _train_pool(pool.replace(size=jnp.ones_like(size)), jax.random.fold_in(key, r),
                           real, model=model, spec=one_net)
    return pool.replace(size=size)


def report(label, slot, images, pool, classes, real, model, spec):
    """Prints one row per class for the net in `slot`; returns its ratios multiplier x CE / match.

    The (slot, class) key fixes the real batch and the DSA draw of both terms.
    """
    params = jax.tree.map(lambda stack: stack[slot], pool.params)
    multiplier = spec.ce_weight * float(distill.meter_accuracy_percent(pool, slot))
    ratios = []
    for c in classes:
        class_images = images[c * spec.ipc:(c + 1) * spec.ipc]
        key = jax.random.fold_in(jax.random.PRNGKey(slot), c)
        match, ce = term_gradients(class_images, c, key, params, real, model, spec)
        ratio = multiplier * rms(ce) / rms(match)
        ratios.append(ratio)
        print(f"{label}\t{c}\t{mean_pairwise_cosine(match):.3f}\t{mean_pairwise_cosine(ce):.3f}\t"
              f"{rms(match):.4g}\t{rms(ce):.4g}\t{multiplier:.1f}\t{ratio:.3g}")
    return ratios


def main(argv):
    del argv
    config = _CONFIG.value
    if config.method not in ("idm", "bacon") or config.ipc < 2:
        raise app.UsageError("Needs an IDM/BACON config with ipc >= 2 (a pool and several images).")
    if bool(_WORKDIR.value) == bool(_FRESH_NET_STEPS.value):
        raise app.UsageError("Give either --workdir (a run's checkpoint) or --fresh_net_steps.")
    dataset = data.load_dataset(config.dataset)
    real = distill.real_data_from_dataset(dataset)
    spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size,
                                    mesh=train.make_mesh(config))
    model = models.get_model(config.model, dataset.num_classes, dataset.image_shape)
    classes = [int(c) for c in _CLASSES.value]
    state = distill.init_state(jax.random.PRNGKey(config.seed), real, model, spec)
    print(f"{config.model}, {config.method}; columns: net, class, mean pairwise cosine of the "
          f"{spec.ipc} per-image gradients (matching, CE), RMS (matching, CE per unit multiplier), "
          f"CE multiplier, multiplier x CE RMS / matching RMS")

    if _FRESH_NET_STEPS.value:
        steps = [int(s) for s in _FRESH_NET_STEPS.value]
        if any(s <= 0 or s % spec.model_train_steps for s in steps) or steps != sorted(steps):
            raise app.UsageError(f"--fresh_net_steps must increase and be positive multiples of "
                                 f"model_train_steps={spec.model_train_steps}; got {steps}.")
        images, _ = distill.synthetic_set(state, spec)
        pool, done = state.pool, 0
        for total in steps:
            pool = train_fresh_net(pool, jax.random.fold_in(jax.random.PRNGKey(config.seed), total),
                                   (total - done) // spec.model_train_steps, real, model, spec)
            done = total
            ratios = report(f"{total} steps", 0, images, pool, classes, real, model, spec)
            print(f"{total} steps: median ratio {np.median(ratios):.3g} "
                  f"(min {min(ratios):.3g}, max {max(ratios):.3g})")
        return

    manager = checkpointing.make_manager(f"{_WORKDIR.value}/exp0/checkpoints")
    state = checkpointing.restore_latest(manager, state,
                                         checkpointing.state_metadata(config, dataset.spec),
                                         max_step=int(config.iterations))
    if state is None:
        raise app.UsageError(f"No checkpoint under {_WORKDIR.value}/exp0/checkpoints.")
    images, _ = distill.synthetic_set(state, spec)
    print(f"iteration {int(state.step)}")
    for slot in range(min(_NETS.value, int(state.pool.size))):
        report(f"slot {slot}", slot, images, state.pool, classes, real, model, spec)


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
