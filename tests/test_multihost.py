"""Multi-host: `experiments/run.py --multihost` as two processes on this machine (SPEC A3, issue 4).

Two CPU processes with two devices each form one 4-device mesh through `jax.distributed` (gloo
collectives), exactly as the hosts of a pod slice do. The run (distillation, checkpoints,
evaluation, exports) must give the same synthetic set and accuracies as one process, and only
process 0 writes. DM keeps the compile short; the BACON pool's data-parallel training was checked
the same way by hand (RESULTS.md).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from bacon_jax import config_lib, train
from tests.subprocess_env import subprocess_env

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
ARG = ("ipc1,method=dm,model=ConvNetW8,eval.models=ConvNetW8,iterations=3,eval.epochs=2,"
       "eval.num_eval=3,num_exp=1,checkpoint_every=2,eval.intermediate=False")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, port, process_id):
    env = subprocess_env(device_count=2)
    command = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--multihost",
               f"--coordinator_address=localhost:{port}", "--num_processes=2",
               f"--process_id={process_id}", f"--config={ROOT}/configs/digits.py:{ARG}",
               f"--workdir={workdir}"]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_processes_equal_one(tmp_path):
    workdir = tmp_path / "two"
    port = _free_port()
    processes = [_launch(workdir, port, p) for p in (0, 1)]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    # Process 0 logs progress; process 1 only warnings.
    assert "final (it 3)" in outputs[0] and "final (it 3)" not in outputs[1]
    # A rerun: every process opens the existing checkpoints before any writes (collectively).
    port = _free_port()
    processes = [_launch(workdir, port, p) for p in (0, 1)]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "already finished" in outputs[0]

    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "digits.py"), ARG)
    train.train_and_evaluate(config, str(tmp_path / "one"))
    two = json.loads((workdir / "results.json").read_text())["results"]["ConvNetW8"]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["results"]["ConvNetW8"]
    np.testing.assert_allclose(two["accuracies"], one["accuracies"])
    exported = [np.load(d / "exp0" / "synthetic.npz") for d in (workdir, tmp_path / "one")]
    np.testing.assert_allclose(exported[0]["images"], exported[1]["images"], atol=1e-6)
