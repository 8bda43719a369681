"""End-to-end tests of the driver: outputs, resume, refusal of foreign runs, divergence, Ctrl-C."""

import glob
import json
import os
import socket

import numpy as np
import pytest

from bacon_jax import checkpointing, config_lib, errors, train, workdir
from tests import test_export

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def _config(arg):
    tiny = ("model=ConvNetW8,eval.models=ConvNetW8,eval.epochs=2,eval.num_eval=2,iterations=4,"
            "checkpoint_every=2,num_exp=1,log_every=1,batch_real=16,net_num=5,trained_bs=16,"
            "model_train_steps=2,eval.every=2,eval.intermediate=False,net_generate_interval=2")
    # `arg` comes last: its values win over the tiny defaults.
    return config_lib.load_config_file(os.path.join(CONFIGS, "digits.py"), f"{tiny},{arg}")


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
        rows = [json.loads(line)
                for line in (tmp_path / "exp0" / "metrics.jsonl").read_text().splitlines()]
        assert [row["iteration"] for row in rows] == [0, 1, 2, 3]
        # Only the terms the method uses: DM has no synthetic CE and no pool; CMI is off.
        applies = {"bacon": {"ce_loss", "ce_multiplier", "pool_size"}, "dm": set()}[method]
        assert {"ce_loss", "ce_multiplier", "pool_size", "cmi_loss"} & set(rows[0]) == applies
        manager = checkpointing.make_manager(str(tmp_path / "exp0" / "checkpoints"))
        assert manager.latest_step() == 4
    assert not (tmp_path / workdir.LOCK_NAME).exists()  # released


def test_resume_equals_uninterrupted(tmp_path):
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(_config("ipc1,method=bacon,iterations=4"), straight)
    interrupted = tmp_path / "interrupted"
    # The first run stops after the checkpoint at iteration 2; the rerun resumes from it.
    train.train_and_evaluate(_config("ipc1,method=bacon,iterations=2"), str(interrupted))
    # As if the process had died after logging iteration 2 and before its next checkpoint.
    exp_dir = interrupted / "exp0"
    with open(exp_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 2, "loss": 1.0, "time": 0.0}) + "\n")
    train.train_and_evaluate(_config("ipc1,method=bacon,iterations=4"), str(interrupted))
    first, second = _synthetic(straight), _synthetic(str(interrupted))
    np.testing.assert_allclose(first[0], second[0], rtol=0, atol=1e-6)
    lines = (exp_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]  # no row twice
    # One event stream, rebuilt from the rows kept: every step once, the final evaluation once.
    assert len(glob.glob(str(exp_dir / "events.out.tfevents.*"))) == 1
    events = test_export.read_events(str(exp_dir))
    assert sorted(events["train/loss"]) == [0, 1, 2, 3] and sorted(events["eval/ConvNetW8"]) == [4]
    rows = [json.loads(line) for line in lines]
    assert [events["train/loss"][it] for it in range(4)] == pytest.approx(
        [row["loss"] for row in rows], rel=1e-6)


def test_rerun_with_other_settings_is_refused_before_anything_is_written(tmp_path):
    train.train_and_evaluate(_config("ipc1,method=dm"), str(tmp_path))
    written = {name: (tmp_path / name).read_text() for name in ("config.json", "results.json")}
    with pytest.raises(errors.UserError, match="method: run 'dm', this config 'idm'"):
        train.train_and_evaluate(_config("ipc1,method=idm"), str(tmp_path))
    # A finished run with other distillation settings: refused, every differing field named.
    with pytest.raises(errors.UserError,
                       match=r"lr_img: run 1.0, this config 5.0; seed: run 0, this config 1\)"):
        train.train_and_evaluate(_config("ipc1,method=dm,lr_img=5,seed=1"), str(tmp_path))
    with pytest.raises(errors.UserError, match="iterations: run 4, this config 2 .may only grow"):
        train.train_and_evaluate(_config("ipc1,method=dm,iterations=2"), str(tmp_path))
    for name, text in written.items():  # nothing rewritten
        assert (tmp_path / name).read_text() == text
    # Without config.json, the checkpoints' own record still refuses them.
    os.remove(tmp_path / "config.json")
    with pytest.raises(errors.UserError, match="seed: checkpoint 0 vs config 1"):
        train.train_and_evaluate(_config("ipc1,method=dm,seed=1"), str(tmp_path))
    shorter = _config("ipc1,method=dm")
    shorter.iterations = 2
    with pytest.raises(errors.UserError, match="at iteration 4, past this config's iterations=2"):
        train.train_and_evaluate(shorter, str(tmp_path))
    assert not (tmp_path / "config.json").exists()
    assert (tmp_path / "results.json").read_text() == written["results.json"]
    assert not (tmp_path / workdir.LOCK_NAME).exists()


def test_a_run_in_progress_is_seen_and_locked(tmp_path):
    # A run that has started (config.json written, no checkpoint yet) and still holds the lock.
    started = _config("ipc1,method=dm")
    (tmp_path / "config.json").write_text(json.dumps(config_lib.to_dict(started)))
    with pytest.raises(errors.UserError, match="seed: run 0, this config 1"):
        train.train_and_evaluate(_config("ipc1,method=dm,seed=1"), str(tmp_path))
    lock = tmp_path / workdir.LOCK_NAME
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "then",
              "command": "python experiments/run.py ..."}
    lock.write_text(json.dumps(holder))
    with pytest.raises(errors.UserError, match=f"in use by process {os.getppid()} on "):
        train.train_and_evaluate(started, str(tmp_path))
    assert json.loads(lock.read_text()) == holder and not (tmp_path / "exp0").exists()


def test_rerun_of_a_finished_run_reevaluates_only_when_evaluation_settings_change(tmp_path):
    run_dir = str(tmp_path)
    first = train.train_and_evaluate(_config("ipc1,method=dm"), run_dir)
    evals = tmp_path / "exp0" / "evals.jsonl"
    final_path = tmp_path / "exp0" / "final.json"
    final = json.loads(final_path.read_text())
    # final.json is in percent, as results.json.
    assert final["unit"] == "percent"
    assert final["accuracies"]["ConvNetW8"] == first["results"]["ConvNetW8"]["accuracies"]
    assert len(evals.read_text().splitlines()) == 1
    schedule_only = _config("ipc1,method=dm")
    schedule_only.eval.intermediate = True
    same = train.train_and_evaluate(schedule_only, run_dir)
    assert same["results"] == first["results"]  # reused: nothing evaluated again
    assert len(evals.read_text().splitlines()) == 1
    # A final.json of an earlier version, in fractions, reads back as the same percentages.
    final_path.write_text(json.dumps({
        "iteration": 4, "evaluation": final["evaluation"],
        "accuracies": {"ConvNetW8": [a / 100 for a in final["accuracies"]["ConvNetW8"]]}}))
    again = train.train_and_evaluate(schedule_only, run_dir)
    assert again["results"]["ConvNetW8"]["accuracies"] == pytest.approx(
        first["results"]["ConvNetW8"]["accuracies"], rel=1e-12)
    one_net = _config("ipc1,method=dm")
    one_net.eval.num_eval = 1
    fewer = train.train_and_evaluate(one_net, run_dir)
    assert fewer["results"]["ConvNetW8"]["num_runs"] == 1
    rows = [json.loads(line) for line in evals.read_text().splitlines()]
    assert [row["num_runs"] for row in rows] == [1]  # the final evaluation's row, replaced
    final = json.loads(final_path.read_text())
    assert final["evaluation"]["num_eval"] == 1 and len(final["accuracies"]["ConvNetW8"]) == 1
    assert json.loads((tmp_path / "results.json").read_text())["config"]["eval"]["num_eval"] == 1
    # A final.json that does not record its evaluation settings is not trusted: evaluated again.
    del final["evaluation"]
    final_path.write_text(json.dumps(final))
    train.train_and_evaluate(one_net, run_dir)
    assert "evaluation" in json.loads(final_path.read_text())
    assert len(evals.read_text().splitlines()) == 1


@pytest.mark.parametrize("field", ["model", "eval.models"])
def test_architecture_too_small_for_the_images_is_refused_before_the_run(tmp_path, field):
    config = _config("ipc1,method=dm")
    if field == "model":
        config.model = "VGG11"
    else:
        config.eval.models = ("ConvNetW8", "VGG11")
    with pytest.raises(errors.UserError, match="'VGG11' cannot take images of shape"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_class_without_training_images_is_refused_before_the_run(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 10
    labels[labels == 7] = 3  # class 7 has no training image
    np.savez(tmp_path / "data.npz", x_train=rng.integers(0, 256, (40, 8, 8, 1), np.uint8),
             y_train=labels, x_test=np.zeros((10, 8, 8, 1), np.uint8), y_test=np.arange(10))
    config = _config(f"ipc1,method=dm,dataset.source=npz,dataset.path={tmp_path / 'data.npz'}")
    with pytest.raises(errors.UserError, match=r"classes \[7\] have no training example"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_divergence_stops_before_checkpointing(tmp_path):
    # 1e38 is a valid learning rate, but the updated images' mean square overflows float32.
    config = _config("ipc1,method=dm,checkpoint_every=1,lr_img=1e38")
    with pytest.raises(errors.UserError, match="diverged: non-finite image_rms at iteration 0"):
        train.train_and_evaluate(config, str(tmp_path))
    manager = checkpointing.make_manager(str(tmp_path / "exp0" / "checkpoints"))
    assert manager.latest_step() is None


def test_ctrl_c_names_the_iteration_and_checkpoint_and_releases_the_lock(tmp_path, monkeypatch):
    save = checkpointing.save

    def save_then_interrupt(manager, step, state, metadata):
        save(manager, step, state, metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "save", save_then_interrupt)
    with pytest.raises(errors.Interrupted) as interrupt:
        train.train_and_evaluate(_config("ipc1,method=dm"), str(tmp_path))
    assert str(interrupt.value) == (
        f"Interrupted in experiment 0 at iteration 2 of 4; the latest checkpoint is iteration 2 "
        f"in {tmp_path}/exp0/checkpoints. Rerun the same command to resume from there.")
    assert not (tmp_path / workdir.LOCK_NAME).exists()


def test_unknown_values_are_rejected_with_allowed_list(tmp_path):
    with pytest.raises(errors.UserError,
                       match=r"Unknown method 'dsa'; allowed: random, dm, idm, bacon"):
        _config("ipc1,method=dsa")
    config = _config("ipc1")
    config.eval.models = ("ConvNet", "ResNet99")
    with pytest.raises(ValueError, match="Unknown architecture 'ResNet99'; allowed: .*ResNet18"):
        train.train_and_evaluate(config, str(tmp_path))
