"""The scripts as a user runs them (subprocesses, so slow: few and tiny): what they print.

One tiny DM run on digits through `experiments/run.py` prints only the project's own lines (no
Orbax INFO lines, which `--library_logs` brings back); a refused rerun ends with one `ERROR:`
line; `--help` lists what the code accepts.
"""

import os
import re
import subprocess
import sys

from bacon_jax import config_lib, data
from tests.subprocess_env import subprocess_env

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TINY = ("ipc1,method=dm,model=ConvNetW8,eval.models=ConvNetW8,eval.epochs=1,eval.num_eval=1,"
        "iterations=2,checkpoint_every=1,log_every=1,num_exp=1")
# An absl log line: level letter, date, time, thread, file:line].
LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ")
OWN_FILES = {os.path.basename(p) for d in ("bacon_jax", "experiments")
             for p in os.listdir(os.path.join(ROOT, d)) if p.endswith(".py")}


def _run(script, *args):
    return subprocess.run(  # one CPU device: quick
        [sys.executable, os.path.join(ROOT, "experiments", script), *args], cwd=ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False)


def test_a_run_prints_only_its_own_lines_and_a_refusal_one_line(tmp_path):
    workdir = tmp_path / "run"
    config = f"--config=configs/digits.py:{TINY}"
    result = _run("run.py", config, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    info_sources = {LOG_LINE.match(line).group(2) for line in lines
                    if LOG_LINE.match(line) and line.startswith("I")}
    assert info_sources <= OWN_FILES, info_sources - OWN_FILES  # libraries: warnings only
    assert all(LOG_LINE.match(line) for line in lines), lines  # nothing else either
    text = result.stderr
    for expected in ("compiling distill_step for dm on 1 device(s)", "[exp 0] it 2/2",
                     "evaluation at it 2, ConvNetW8: training 1 networks x 2 epochs",
                     "final (it 2) ConvNetW8", "digits dm ipc1 ConvNetW8"):
        assert expected in text, expected

    again = _run("run.py", config, f"--workdir={workdir}", "--library_logs")
    assert again.returncode == 0 and "already finished" in again.stderr
    assert "orbax" in again.stderr  # the restore's INFO lines are back

    refused = _run("run.py", f"{config},lr_img=5", f"--workdir={workdir}")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and "lr_img: run 1.0, this config 5.0" in errors[0]
    assert refused.stderr.strip().splitlines()[-1] == errors[0]


def test_help_lists_configs_datasets_methods_and_fields():
    result = _run("run.py", "--help")
    text = result.stdout
    assert "python experiments/run.py --config=configs/digits.py:ipc10" in text  # the docstring
    assert "configs/mnist.py: presets ipc1, ipc10, ipc50" in text
    assert ", ".join(data.DATASETS) in text and ", ".join(config_lib.METHODS) in text
    assert "  eval.num_eval = 5  # contract: fresh networks per evaluation" in text
    assert "--[no]library_logs" in text and "--workdir" in text
