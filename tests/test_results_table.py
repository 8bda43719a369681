"""Tests of experiments/results_table.py on fake results.json files."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
SCRIPT = os.path.join(ROOT, "experiments", "results_table.py")


def _module():
    spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(mean, std, runs):
    return {"accuracies": [], "mean": mean, "std": std, "num_runs": runs}


def _write(directory, results):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "results.json"), "w") as f:
        json.dump(results, f)


def _fake_runs(root):
    _write(os.path.join(root, "bacon"), {
        "dataset": "cifar10", "method": "bacon", "ipc": 10,
        "results": {"ConvNet": _summary(62.061, 0.4449, 25)},
        "reevaluations": [
            {"model": "ResNet18", **_summary(40.0, 1.0, 25), "timestamp": "2026-01-01T00:00:00"},
            {"model": "ResNet18", **_summary(41.0, 1.5, 25), "timestamp": "2026-01-02T00:00:00"},
            {"model": "AlexNet", **_summary(30.0, 2.0, 5), "timestamp": "2026-01-01T00:00:00"},
            # Already evaluated by the run: its own (reported) number wins.
            {"model": "ConvNet", **_summary(10.0, 0.0, 5), "timestamp": "2026-01-03T00:00:00"},
        ],
    })
    _write(os.path.join(root, "nested", "dm"), {
        "dataset": "cifar10", "method": "dm", "ipc": 10,
        "results": {"ConvNet": _summary(48.9, 0.6, 25)},
    })


EXPECTED = """\
| Dataset | IPC | Method | Architecture | Accuracy (%) | Runs |
|---|---|---|---|---|---|
| cifar10 | 10 | DM | ConvNet | 48.90 ± 0.60 | 25 |
| cifar10 | 10 | BACON | AlexNet | 30.00 ± 2.00 | 5 |
| cifar10 | 10 | BACON | ConvNet | 62.06 ± 0.44 | 25 |
| cifar10 | 10 | BACON | ResNet18 | 41.00 ± 1.50 | 25 |
"""


def test_table_of_two_results_files(tmp_path):
    _fake_runs(str(tmp_path))
    module = _module()
    # Workdirs, a results.json file, or a directory searched recursively give the same table.
    by_workdir = module.table_from_paths([str(tmp_path / "bacon"), str(tmp_path / "nested" / "dm")])
    by_file = module.table_from_paths([str(tmp_path / "bacon" / "results.json"),
                                       str(tmp_path / "nested")])
    by_search = module.table_from_paths([str(tmp_path)])
    assert by_workdir == by_file == by_search == EXPECTED


def test_script_prints_and_writes(tmp_path):
    _fake_runs(str(tmp_path))
    output = tmp_path / "table.md"
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path), f"--output={output}"],
                          check=True, capture_output=True, text=True)
    assert done.stdout == EXPECTED
    assert output.read_text() == EXPECTED
