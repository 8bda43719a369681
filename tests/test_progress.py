"""Tests for bacon_jax.progress: the metrics shown, rates, ETAs and how often lines are printed."""

import os

import pytest

from bacon_jax import config_lib, progress

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
METRICS = {"ce_loss": 2.3, "ce_multiplier": 4.0, "cmi_loss": 0.5, "image_rms": 1.0, "loss": 3.0,
           "match_loss": 0.7, "pool_size": 3.0}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("arg, shown", [
    ("ipc10,method=dm", {"image_rms", "loss", "match_loss", "pool_size"}),
    ("ipc10,method=bacon", {"ce_loss", "ce_multiplier", "image_rms", "loss", "match_loss",
                            "pool_size"}),
    ("ipc10,method=idm,syn_ce=false", {"image_rms", "loss", "match_loss", "pool_size"}),
    ("ipc10,method=dm,cmi.weight=8000", {"cmi_loss", "image_rms", "loss", "match_loss",
                                         "pool_size"}),
])
def test_only_the_terms_the_method_uses_are_shown(arg, shown):
    config = config_lib.load_config_file(os.path.join(CONFIGS, "digits.py"), arg)
    assert set(progress.shown_metrics(METRICS, config)) == shown


def _estimate(**overrides):
    settings = dict(iterations=10, num_exp=2, eval_every=5, intermediate=True,
                    models=("ConvNet", "AlexNet"), net_epochs=100)
    return progress.RunEstimate(**{**settings, **overrides})


def test_evaluations_left_count_intermediate_and_final_ones():
    estimate = _estimate()
    assert estimate.evaluations_from(0, 0) == 4  # it 5 and 10 in each of two experiments
    assert estimate.evaluations_from(0, 5) == 4
    assert estimate.evaluations_from(0, 6) == 3
    assert estimate.evaluations_from(1, 11) == 0  # after the last final evaluation
    assert _estimate(intermediate=False).evaluations_from(0, 0) == 2
    config = config_lib.load_config_file(os.path.join(CONFIGS, "digits.py"), "ipc10")
    from_config = progress.RunEstimate.from_config(config, 200)
    assert from_config.net_epochs == 5 * 301 and from_config.evaluations_from(0, 0) == 1


def test_run_seconds_left_once_every_rate_is_known():
    estimate = _estimate()
    estimate.distill_rate = 2.0
    assert estimate.seconds_left(0, 4, 4) is None  # no evaluation timed yet
    estimate.eval_rates = {"ConvNet": 10.0, "AlexNet": 50.0}  # 10 s + 2 s per evaluation
    assert estimate.seconds_left(0, 4, 4) == pytest.approx((6 + 10) / 2.0 + 4 * 12.0)


def test_distillation_lines():
    clock, estimate = Clock(), _estimate()
    line = progress.DistillProgress(10, estimate, 0, clock=clock).line
    first = line(2, {"loss": 0.5})
    assert first == "[exp 0] it 2/10 loss 0.5 | rate and ETA from the next line on"
    clock.now += 4.0
    assert line(4, {"loss": 0.25}) == ("[exp 0] it 4/10 loss 0.25 | 0.5 it/s, distillation ETA "
                                       "0.2 min, run ETA: evaluation not timed yet")
    estimate.eval_rates = {"ConvNet": 10.0, "AlexNet": 50.0}
    clock.now += 4.0
    # (4 + 10 iterations) / 0.5 it/s + 3 evaluations (it 10; it 5 and 10) x 12 s = 64 s.
    assert line(6, {"loss": 0.125}).endswith("distillation ETA 0.1 min, run ETA est. 1.1 min")


def test_evaluation_lines_are_rate_limited_and_time_the_architecture():
    clock, estimate, lines = Clock(), _estimate(num_exp=1, intermediate=False), []
    estimate.eval_rates["AlexNet"] = 50.0
    callback = progress.EvalProgress(estimate, 0, 10, "ConvNet", ("AlexNet",), total=100,
                                     clock=clock, log=lines.append)
    clock.now += 30.0  # the first epoch compiles
    callback(1)
    assert lines == ["[exp 0] evaluation at it 10, ConvNet: 1/100 network-epochs after 30.0 s "
                     "(compilation included)"]
    for _ in range(98):  # 2 s per network-epoch: a line every 10 s
        clock.now += 2.0
        callback(1)
    assert len(lines) == 1 + 98 * 2 // 10
    assert lines[1] == ("[exp 0] evaluation at it 10, ConvNet: 6/100 network-epochs, 0.5/s, "
                        "ETA 3.1 min, run ETA est. 3.2 min")  # + 2 s of AlexNet
    clock.now += 2.0
    callback(1)  # the last one is always printed
    assert lines[-1].startswith("[exp 0] evaluation at it 10, ConvNet: 100/100 network-epochs")
    assert estimate.eval_rates["ConvNet"] == pytest.approx(0.5)
