"""Tests of reevaluate.py and experiments/evaluate.py: re-evaluating a tiny saved run."""

import importlib.util
import json
import os
import socket
import sys
from unittest import mock

from absl import flags
import numpy as np
import pytest

from bacon_jax import errors, reevaluate, train, workdir

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
# A random-real-image "run" with the x4 expansion: no distillation to compile, but a saved set that
# re-evaluation must expand (SPEC 4.3).
ARG = ("ipc1,method=random,expand=true,model=ConvNetW8,eval.models=ConvNetW8,eval.epochs=1,"
       "eval.num_eval=2,num_exp=1")


def _config(arg=ARG):
    spec = importlib.util.spec_from_file_location(
        "digits_config", os.path.join(ROOT, "configs", "digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(_config(), workdir)
    return workdir


def _run_evaluate_script(argv):
    """Runs experiments/evaluate.py's main in this process (its compiled evaluations are reused).

    The script's flags go on absl's global FLAGS; they are removed afterwards so that another
    script's flags of the same names can be defined later in this process.
    """
    def remove_flags():
        for name in list(flags.FLAGS):
            if name in ("config", "workdir", "eval_mode") or name.startswith("config."):
                delattr(flags.FLAGS, name)

    remove_flags()
    spec = importlib.util.spec_from_file_location(
        "evaluate_script", os.path.join(ROOT, "experiments", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        # The config flag reads its `--config.*` overrides from sys.argv.
        with mock.patch.object(sys, "argv", argv):
            flags.FLAGS(argv)
            module.main([argv[0]])
    finally:
        flags.FLAGS.unparse_flags()
        remove_flags()


def test_evaluate_script_appends_entries(run_dir):
    _run_evaluate_script([
        "experiments/evaluate.py", f"--config={os.path.join(ROOT, 'configs', 'digits.py')}:{ARG}",
        f"--workdir={run_dir}", "--config.eval.models=['ConvNetW16','ConvNetW8']",
    ])
    results = json.loads(open(os.path.join(run_dir, "results.json")).read())
    assert "ConvNetW8" in results["results"]  # the run's own numbers are kept
    entries = results["reevaluations"]
    assert [e["model"] for e in entries] == ["ConvNetW16", "ConvNetW8"]
    for entry in entries:
        assert entry["num_runs"] == 2 and entry["num_eval"] == 2 and entry["eval_epochs"] == 1
        assert entry["experiments"] == [0] and entry["expand"] is True
        assert entry["eval_mode"] is None and "evaluate.py" in entry["command"]
        assert entry["mean"] == pytest.approx(np.mean(entry["accuracies"]))
        assert entry["std"] == pytest.approx(np.std(entry["accuracies"]))  # population std
        assert all(0 <= a <= 100 for a in entry["accuracies"])

    # Again, another list: the keys depend on the architecture, not its position; appended.
    config = _config()
    config.eval.models = ("ConvNetW8",)
    appended = reevaluate.reevaluate(config, run_dir, command="test")
    results = json.loads(open(os.path.join(run_dir, "results.json")).read())
    assert [e["model"] for e in results["reevaluations"]] == ["ConvNetW16", "ConvNetW8",
                                                              "ConvNetW8"]
    assert appended[0]["accuracies"] == entries[1]["accuracies"]


def test_config_of_another_run_is_refused(run_dir):
    with pytest.raises(ValueError, match="method: run 'random' vs config 'dm'"):
        reevaluate.reevaluate(_config(ARG.replace("method=random", "method=dm")), run_dir)
    with pytest.raises(ValueError, match="ipc: run 1 vs config 10"):
        reevaluate.reevaluate(_config(ARG.replace("ipc1", "ipc10")), run_dir)


def test_a_run_still_writing_is_not_reevaluated(run_dir):
    lock = os.path.join(run_dir, workdir.LOCK_NAME)
    with open(lock, "w") as f:  # the parent of this process: alive, on this host
        json.dump({"pid": os.getppid(), "host": socket.gethostname(), "started": "now",
                   "command": "python experiments/run.py"}, f)
    try:
        with pytest.raises(errors.UserError, match=f"in use by process {os.getppid()}"):
            reevaluate.reevaluate(_config(), run_dir)
    finally:
        os.remove(lock)


def test_architecture_too_big_for_the_images_fails_early(tmp_path):
    # LeNet and VGG11 do not fit 8x8 digits: refused before any evaluation or file access.
    # Pool M is MLP, ConvNet, LeNet, AlexNet, VGG11, ResNet18: LeNet is the first that cannot fit.
    with pytest.raises(ValueError, match="'LeNet' cannot take images of shape"):
        reevaluate.reevaluate(_config(), str(tmp_path), eval_mode="M")


def test_missing_synthetic_set(tmp_path):
    with pytest.raises(errors.UserError, match="No saved synthetic set"):
        reevaluate.reevaluate(_config(), str(tmp_path))


def test_eval_modes_replace_the_config_models():
    config = _config()
    assert reevaluate.models_for(config) == ("ConvNetW8",)
    assert reevaluate.models_for(config, "W") == ("ConvNetW32", "ConvNetW64", "ConvNetW128",
                                                  "ConvNetW256")
    assert reevaluate.models_for(config, "M")[:2] == ("MLP", "ConvNet")
    assert reevaluate.models_for(config, "SS") == ("ConvNetW8",)
    with pytest.raises(ValueError, match="unknown eval mode 'Q'"):
        reevaluate.models_for(config, "Q")


def test_keys_depend_on_experiment_and_architecture_only():
    key = reevaluate.model_key(0, 1, "ResNet18")
    np.testing.assert_array_equal(key, reevaluate.model_key(0, 1, "ResNet18"))
    for other in (reevaluate.model_key(0, 0, "ResNet18"), reevaluate.model_key(0, 1, "VGG11"),
                  reevaluate.model_key(1, 1, "ResNet18")):
        assert not np.array_equal(key, other)
