"""End to end on every dataset of the paper, through its config file as experiments/run.py does.

The five TFDS datasets come from `tfds.testing.mock_data` (random images and labels with the real
features), Tiny ImageNet from a fake zip with all 200 classes prepared by `bacon_jax.tiny_imagenet`.
Only the budget is overridden (a width-8 ConvNet, 2 iterations, 1 evaluation epoch, ...), and
MNIST's source (its config reads an .npz by default); the dataset settings of each config file
(preset ipc1, shapes, classes, normalisation) are kept.

Two tiers:
* every dataset: config -> data -> the first distillation step traced with `jax.eval_shape` (the
  whole step for its image shape and class count, no compilation; fast);
* one whole run per dataset (`train.train_and_evaluate`: two distillation iterations, evaluation,
  export, results.json): the five TFDS datasets from mock data, Tiny ImageNet (3 channels, 64x64,
  200 classes) from array_record files written by the repository's own builder. BACON (the
  configs' default) for MNIST's and CIFAR-100's shapes and class counts, DM for the datasets that
  share one and for Tiny ImageNet (`MOCK_RUN_METHOD`): compiling a BACON step takes 40-120 s on a
  2-core CPU, DM's far less.
"""

import functools
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bacon_jax import checkpointing, data, distill, models, tiny_imagenet, train

HERE = os.path.dirname(__file__)
CONFIGS = os.path.join(HERE, os.pardir, "configs")
TINY_BUDGET = (
    "model=ConvNetW8,eval.models=ConvNetW8,iterations=2,eval.epochs=1,eval.num_eval=1,"
    "num_exp=1,batch_real=8,net_num=4,trained_bs=8,model_train_steps=1,"
    "eval.intermediate=False,checkpoint_every=2"
)
# Mock labels are drawn at random: enough examples that every class has some (checked below).
MOCK_EXAMPLES = {"mnist": 60, "fashion_mnist": 60, "svhn": 60, "cifar10": 60, "cifar100": 1000}


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(name, data_dir, method="bacon"):
    module = _load_module(os.path.join(CONFIGS, f"{name}.py"), f"{name}_config")
    config = module.get_config(f"ipc1,method={method},{TINY_BUDGET}")
    # configs/mnist.py reads ../shared/data/mnist.npz by default; here it reads TFDS like the rest.
    config.dataset.source = "tfds"
    config.dataset.data_dir = str(data_dir)
    return config


@pytest.fixture(scope="module")
def tiny_imagenet_dir(tmp_path_factory):
    """A fake tiny-imagenet-200.zip with all 200 classes, prepared.

    Two training images per class: BACON's unbiased standard deviation of one real image is NaN
    (as torch.std's is in the reference).
    """
    root = tmp_path_factory.mktemp("tiny_imagenet")
    fake = _load_module(os.path.join(HERE, "test_tiny_imagenet.py"), "_tiny_imagenet_fake")
    archive = root / tiny_imagenet.ARCHIVE_NAME
    wnids = tuple(f"n{k:08d}" for k in range(tiny_imagenet.NUM_CLASSES))
    fake.write_fake_archive(archive, wnids=wnids, n_train=2, n_val=tiny_imagenet.NUM_CLASSES)
    tiny_imagenet.prepare(str(root / "tfds"), archive=str(archive))
    return root / "tfds"


def _load(name, data_dir):
    """(config, dataset) for `name`, from mock TFDS data or the prepared fake Tiny ImageNet."""
    config = _config(name, data_dir)
    if name == "tiny_imagenet":
        return config, data.load_dataset(config.dataset)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES[name]):
        return config, data.load_dataset(config.dataset)


def _check_dataset(config, dataset):
    spec = data.DATASETS[config.dataset.name]
    assert dataset.spec == spec and config.dataset.name == spec.name
    assert dataset.x_train.shape[1:] == spec.image_shape and dataset.x_train.dtype == np.uint8
    counts = np.bincount(dataset.y_train, minlength=spec.num_classes)
    assert counts.min() > 0, f"fake data leaves classes {np.flatnonzero(counts == 0)} empty"


@pytest.mark.parametrize("name", sorted(MOCK_EXAMPLES) + ["tiny_imagenet"])
def test_config_reaches_first_distillation_step(name, tmp_path, request):
    if name == "tiny_imagenet":
        data_dir = request.getfixturevalue("tiny_imagenet_dir")
    else:
        data_dir = tmp_path / "tfds"
    config, dataset = _load(name, data_dir)
    _check_dataset(config, dataset)
    # What train.run_experiment builds before its first step, traced instead of compiled.
    real = distill.real_data_from_dataset(dataset)
    spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size,
                                    mesh=train.make_mesh(config))
    model = models.get_model(config.model, dataset.num_classes, dataset.image_shape)
    state = jax.eval_shape(
        functools.partial(distill.init_state, model=model, spec=spec), jax.random.PRNGKey(0), real
    )
    state, metrics = jax.eval_shape(
        functools.partial(distill.distill_step, model=model, spec=spec), state, real
    )
    assert state.images.shape == (dataset.num_classes * config.ipc,) + dataset.image_shape
    assert "loss" in metrics


def _run_and_check(config, workdir):
    spec = data.DATASETS[config.dataset.name]
    train.train_and_evaluate(config, str(workdir))
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["dataset"] == config.dataset.name and saved["method"] == config.method
    assert saved["results"]["ConvNetW8"]["num_runs"] == 1
    lines = (workdir / "exp0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1]
    tree = checkpointing.load_pytree(str(workdir / "exp0" / "synthetic"))
    assert np.asarray(tree["images"]).shape == (spec.num_classes,) + spec.image_shape
    np.testing.assert_array_equal(np.asarray(tree["labels"]), np.arange(spec.num_classes))


def test_tiny_imagenet_run_writes_results(tiny_imagenet_dir, tmp_path):
    # DM: the whole run for the 64x64x3 shape and 200 classes (BACON's step for them is traced in
    # test_config_reaches_first_distillation_step; compiling it takes ~2 min on 2 CPU cores).
    _run_and_check(_config("tiny_imagenet", tiny_imagenet_dir, "dm"), tmp_path / "work")


# BACON (the configs' default) where the image shape or class count is new to this file; DM, whose
# step compiles ~5x faster on CPU, for the datasets sharing a shape with one of those.
MOCK_RUN_METHOD = {"mnist": "bacon", "cifar100": "bacon", "fashion_mnist": "dm", "svhn": "dm",
                   "cifar10": "dm"}


@pytest.mark.parametrize("name", sorted(MOCK_EXAMPLES))
def test_mock_tfds_run_writes_results(name, tmp_path):
    config = _config(name, tmp_path / "tfds", MOCK_RUN_METHOD[name])
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES[name]):
        _run_and_check(config, tmp_path / "work")
