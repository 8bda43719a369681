"""End-to-end tests of the experiment driver: outputs, resume, refusal of foreign checkpoints, NaN."""

import json
import os

import numpy as np
import pytest

from bacon_jax import checkpointing, config_lib, train

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def _config(arg):
    tiny = ("model=ConvNetW8,eval.models=ConvNetW8,eval.epochs=2,eval.num_eval=2,iterations=4,"
            "checkpoint_every=2,num_exp=1,log_every=1,batch_real=16,net_num=5,trained_bs=16,"
            "model_train_steps=2,eval.every=2,eval.intermediate=False,net_generate_interval=2")
    return config_lib.load_config_file(os.path.join(CONFIGS, "digits.py"), f"{arg},{tiny}")


def _synthetic(workdir, exp=0):
    tree = checkpointing.load_pytree(os.path.join(workdir, f"exp{exp}", "synthetic"))
    return np.asarray(tree["images"]), np.asarray(tree["labels"])


@pytest.mark.parametrize("method", ["bacon", "dm", "random"])
def test_run_writes_results_metrics_and_checkpoint(tmp_path, method):
    config = _config(f"ipc1,method={method}")
    results = train.train_and_evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["ConvNetW8"]["num_runs"] == 2
    summary = saved["results"]["ConvNetW8"]
    assert summary["mean"] == pytest.approx(np.mean(summary["accuracies"]))
    assert summary["std"] == pytest.approx(np.std(summary["accuracies"]))  # population std
    assert results["method"] == method
    assert (tmp_path / "config.json").exists()
    images, labels = _synthetic(str(tmp_path))
    assert images.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(labels, np.arange(10))
    if method != "random":
        lines = (tmp_path / "exp0" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]
        manager = checkpointing.make_manager(str(tmp_path / "exp0" / "checkpoints"))
        assert manager.latest_step() == 4


def test_resume_equals_uninterrupted(tmp_path):
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(_config("ipc1,method=bacon,iterations=4"), straight)
    interrupted = str(tmp_path / "interrupted")
    # The first run stops after the checkpoint at iteration 2; the rerun resumes from it.
    train.train_and_evaluate(_config("ipc1,method=bacon,iterations=2"), interrupted)
    train.train_and_evaluate(_config("ipc1,method=bacon,iterations=4"), interrupted)
    first, second = _synthetic(straight), _synthetic(interrupted)
    np.testing.assert_allclose(first[0], second[0], rtol=0, atol=1e-6)
    lines = (tmp_path / "interrupted" / "exp0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]


def test_checkpoint_of_another_config_is_refused(tmp_path):
    train.train_and_evaluate(_config("ipc1,method=dm"), str(tmp_path))
    written = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="method: checkpoint 'dm' vs config 'idm'"):
        train.train_and_evaluate(_config("ipc1,method=idm"), str(tmp_path))
    with pytest.raises(ValueError, match="seed: checkpoint 0 vs config 1"):
        train.train_and_evaluate(_config("ipc1,method=dm,seed=1"), str(tmp_path))
    # A checkpoint past `iterations` belongs to a longer run: refused, not relabelled.
    shorter = _config("ipc1,method=dm")
    shorter.iterations = 2
    with pytest.raises(ValueError, match="at iteration 4, past this config's iterations=2"):
        train.train_and_evaluate(shorter, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == written  # a refused rerun writes nothing


def test_rerun_of_a_finished_run_reevaluates_only_when_evaluation_settings_change(tmp_path):
    workdir = str(tmp_path)
    first = train.train_and_evaluate(_config("ipc1,method=dm"), workdir)
    evals = tmp_path / "exp0" / "evals.jsonl"
    assert len(evals.read_text().splitlines()) == 1
    schedule_only = _config("ipc1,method=dm")
    schedule_only.eval.intermediate = True
    same = train.train_and_evaluate(schedule_only, workdir)
    assert same["results"] == first["results"]  # reused: nothing evaluated again
    assert len(evals.read_text().splitlines()) == 1
    one_net = _config("ipc1,method=dm")
    one_net.eval.num_eval = 1
    fewer = train.train_and_evaluate(one_net, workdir)
    assert fewer["results"]["ConvNetW8"]["num_runs"] == 1
    assert len(evals.read_text().splitlines()) == 2
    final = json.loads((tmp_path / "exp0" / "final.json").read_text())
    assert final["evaluation"]["num_eval"] == 1 and len(final["accuracies"]["ConvNetW8"]) == 1
    assert json.loads((tmp_path / "results.json").read_text())["config"]["eval"]["num_eval"] == 1
    # A final.json that does not record its evaluation settings is not trusted: evaluated again.
    del final["evaluation"]
    (tmp_path / "exp0" / "final.json").write_text(json.dumps(final))
    train.train_and_evaluate(one_net, workdir)
    assert len(evals.read_text().splitlines()) == 3


@pytest.mark.parametrize("field", ["model", "eval.models"])
def test_architecture_too_small_for_the_images_is_refused_before_the_run(tmp_path, field):
    config = _config("ipc1,method=dm")
    if field == "model":
        config.model = "VGG11"
    else:
        config.eval.models = ("ConvNetW8", "VGG11")
    with pytest.raises(ValueError, match="'VGG11' cannot take images of shape"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_before_checkpointing(tmp_path):
    config = _config("ipc1,method=dm,checkpoint_every=1")
    config.lr_img = float("nan")
    with pytest.raises(FloatingPointError, match="iteration 0"):
        train.train_and_evaluate(config, str(tmp_path))
    manager = checkpointing.make_manager(str(tmp_path / "exp0" / "checkpoints"))
    assert manager.latest_step() is None


def test_unknown_values_are_rejected_with_allowed_list(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown method 'dsa'; allowed: random, dm, idm, bacon"):
        _config("ipc1,method=dsa")
    config = _config("ipc1")
    config.eval.models = ("ConvNet", "ResNet99")
    with pytest.raises(ValueError, match="Unknown architecture 'ResNet99'; allowed: .*ResNet18"):
        train.train_and_evaluate(config, str(tmp_path))
