"""Tests of reevaluate.py and experiments/evaluate.py: re-evaluating a tiny saved run, and scoring
sets other programs wrote with the README's commands."""

import importlib.util
import json
import os
import re
import shlex
import socket
import sys
from unittest import mock

from absl import flags
import numpy as np
import pytest
from PIL import Image

from bacon_jax import data, errors, reevaluate, train, workdir

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
    before = set(flags.FLAGS)
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
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)


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


# --------------------------------------------------------------------------------------------
# Sets other programs wrote: the README's commands, run with small settings.

IMPORT_MARKER = "<!-- import-examples -->"
SMALL = ["--config.eval.epochs=1", "--config.eval.num_eval=1", "--config.eval.models=['ConvNetW8']"]


def readme_import_commands():
    """The evaluate.py command lines of the README block after IMPORT_MARKER."""
    text = open(os.path.join(ROOT, "README.md")).read()
    match = re.search(re.escape(IMPORT_MARKER) + r"\s*```\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md has no block after {IMPORT_MARKER}"
    return [shlex.split(line) for line in match.group(1).splitlines() if line.strip()]


def _digits_picks(ipc):
    dataset = data.load_dataset(_config().dataset)
    index, _ = dataset.train_class_index()
    return dataset, index[:, :ipc].reshape(-1)


def _png_folder(path):
    """Ten real digits per class as PNGs in class sub-folders, written by PIL."""
    dataset, picks = _digits_picks(10)
    for count, i in enumerate(picks):
        folder = os.path.join(path, str(dataset.y_train[i]))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(dataset.x_train[i, ..., 0]).save(os.path.join(folder, f"{count}.png"))


def _dm_res_pt(path):
    """A DC/DSA/DM-style res_*.pt: NCHW float tensors in the dataset's normalized space."""
    torch = pytest.importorskip("torch")
    dataset, picks = _digits_picks(10)
    images = np.asarray(dataset.preprocessing.preprocess(dataset.x_train[picks]))
    torch.save({"data": [[torch.tensor(images.transpose(0, 3, 1, 2)),
                          torch.tensor(dataset.y_train[picks])]]}, path)


@pytest.mark.parametrize("which,file_format,ipc,expand", [
    (0, "folder", 10, False), (1, "pt", 10, False), (2, "safetensors", 1, True)])
def test_readme_commands_score_sets_from_anywhere(run_dir, tmp_path, which, file_format, ipc,
                                                  expand):
    argv = readme_import_commands()[which]
    assert argv[:2] == ["python", "experiments/evaluate.py"]
    (set_flag,) = [a for a in argv if a.startswith("--set=")]
    their_path = set_flag.split("=", 1)[1]
    if file_format == "folder":
        local = str(tmp_path / "pngs")
        _png_folder(local)
    elif file_format == "pt":
        local = str(tmp_path / os.path.basename(their_path))
        _dm_res_pt(local)
    else:  # our own export: the fixture run's (a random-real x4 set) instead of /tmp/digits'
        local = os.path.join(run_dir, "exp0", "synthetic.safetensors")
    output = str(tmp_path / "scores")
    argv = [a.replace(their_path, local) if a == set_flag else a for a in argv[1:]]
    argv = [f"--output={output}" if a.startswith("--output=") else a for a in argv]
    argv = [a.replace("configs/", os.path.join(ROOT, "configs") + "/") for a in argv]
    _run_evaluate_script(argv + SMALL)
    (entry,) = json.load(open(os.path.join(output, "results.json")))["imports"]
    assert entry["model"] == "ConvNetW8" and entry["num_runs"] == 1 and entry["ipc"] == ipc
    assert entry["sets"][0]["format"] == file_format and entry["expand"] is expand
    assert entry["eval_epochs"] == 1 and entry["dataset"] == "digits"
    assert 0 <= entry["mean"] <= 100 and entry["source"] == os.path.abspath(local)


def test_external_set_keys_and_errors_before_any_training(run_dir, tmp_path):
    key = reevaluate.import_key(0, 1, "ConvNet")
    np.testing.assert_array_equal(key, reevaluate.import_key(0, 1, "ConvNet"))
    for other in (reevaluate.import_key(0, 0, "ConvNet"), reevaluate.import_key(0, 1, "VGG11"),
                  reevaluate.import_key(1, 1, "ConvNet"), reevaluate.model_key(0, 1, "ConvNet")):
        assert not np.array_equal(key, other)
    path = os.path.join(run_dir, "exp0", "synthetic.safetensors")
    with pytest.raises(ValueError, match="records its preprocessing"):
        reevaluate.evaluate_external(_config(), path, str(tmp_path), preprocessing="pixels")
    with pytest.raises(ValueError, match="'LeNet' cannot take images of shape"):
        reevaluate.evaluate_external(_config(), str(tmp_path / "none"), str(tmp_path),
                                     eval_mode="M")
    assert not (tmp_path / "results.json").exists()
