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


def _config(epochs, num_eval, dsa, expand):
    return {"eval": {"epochs": epochs, "num_eval": num_eval, "dsa": dsa}, "expand": expand}


def _reevaluation(model, mean, std, runs, day, **protocol):
    return {"model": model, **_summary(mean, std, runs), "timestamp": f"2026-01-0{day}T00:00:00",
            "eval_epochs": 1000, "num_eval": 5, "expand": True, **protocol}


def _fake_runs(root):
    _write(os.path.join(root, "bacon"), {
        "dataset": "cifar10", "method": "bacon", "ipc": 10,
        "config": _config(1000, 5, True, True),
        "results": {"ConvNet": _summary(62.061, 0.4449, 25)},
        "reevaluations": [
            _reevaluation("ResNet18", 40.0, 1.0, 25, 1),
            _reevaluation("ResNet18", 41.0, 1.5, 25, 2),
            # Written before re-evaluations recorded DSA: the run's setting is shown.
            {k: v for k, v in _reevaluation("AlexNet", 30.0, 2.0, 5, 1, num_eval=1).items()
             if k != "dsa"},
            # Already evaluated by the run: its own (reported) number wins.
            _reevaluation("ConvNet", 10.0, 0.0, 5, 3),
        ],
        "validation_selected": {"iterations": [900, 1000],
                                "results": {"ConvNet": _summary(61.5, 0.5, 25)}},
    })
    _write(os.path.join(root, "nested", "dm"), {
        "dataset": "cifar10", "method": "dm", "ipc": 10,
        "config": _config(1000, 5, True, False),
        "results": {"ConvNet": _summary(48.9, 0.6, 25)},
    })
    imported = {"dataset": "cifar10", "method": "DATM", "model": "ConvNet", "eval_epochs": 300,
                "num_eval": 2, "dsa": False, "expand": False}
    _write(os.path.join(root, "scores"), {"imports": [
        {**imported, **_summary(50.0, 1.0, 2), "source": "/data/datm/images.pt", "ipc": 10,
         "timestamp": "2026-01-01T00:00:00"},
        {**imported, **_summary(51.0, 1.0, 2), "source": "/data/datm/images.pt", "ipc": 10,
         "timestamp": "2026-01-02T00:00:00"},  # the latest entry per file and architecture
        {**imported, **_summary(20.0, 3.0, 2), "source": "/data/rded", "ipc": None,
         "sets": [{"images_per_class": [9, 10, 11, 10, 10, 10, 10, 10, 10, 10]}],
         "method": "RDED", "timestamp": "2026-01-01T00:00:00"},
    ]})


EXPECTED = """\
| Dataset | IPC | Method | Architecture | Protocol | Accuracy (%) | Runs | Run |
|---|---|---|---|---|---|---|---|
| cifar10 | 10 | DM | ConvNet | 1000 ep, 5 nets, DSA, x1 | 48.90 ± 0.60 | 25 | dm |
| cifar10 | 10 | BACON | AlexNet | 1000 ep, 1 nets, DSA, x4 | 30.00 ± 2.00 | 5 | bacon |
| cifar10 | 10 | BACON | ConvNet | 1000 ep, 5 nets, DSA, x4 | 62.06 ± 0.44 | 25 | bacon |
| cifar10 | 10 | BACON | ConvNet | 1000 ep, 5 nets, DSA, x4 | 61.50 ± 0.50 | 25 | bacon (val-selected, it 900, 1000) |
| cifar10 | 10 | BACON | ResNet18 | 1000 ep, 5 nets, DSA, x4 | 41.00 ± 1.50 | 25 | bacon |
| cifar10 | 10 | DATM | ConvNet | 300 ep, 2 nets, no DSA, x1, imported | 51.00 ± 1.00 | 2 | data/datm/images.pt |
| cifar10 | 9-11 | RDED | ConvNet | 300 ep, 2 nets, no DSA, x1, imported | 20.00 ± 3.00 | 2 | /data/rded |
"""


def test_table_of_two_results_files(tmp_path):
    _fake_runs(str(tmp_path))
    module = _module()
    # Workdirs, a results.json file, or a directory searched recursively give the same table.
    by_workdir = module.table_from_paths([str(tmp_path / "bacon"), str(tmp_path / "nested" / "dm"),
                                          str(tmp_path / "scores")])
    by_file = module.table_from_paths([str(tmp_path / "bacon" / "results.json"),
                                       str(tmp_path / "nested"), str(tmp_path / "scores")])
    by_search = module.table_from_paths([str(tmp_path)])
    assert by_workdir == by_file == by_search == EXPECTED


def test_script_prints_and_writes(tmp_path):
    _fake_runs(str(tmp_path))
    output = tmp_path / "table.md"
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path), f"--output={output}"],
                          check=True, capture_output=True, text=True)
    assert done.stdout == EXPECTED
    assert output.read_text() == EXPECTED
