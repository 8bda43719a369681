"""benchmarks/accelerator_rows.py: the RESULTS.md section accelerator_check.sh appends."""

import importlib.util
import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _rows_module():
    spec = importlib.util.spec_from_file_location(
        "accelerator_rows", os.path.join(ROOT, "benchmarks", "accelerator_rows.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DISTILL = {"benchmark": "distill_speed", "config": "configs/cifar10.py:ipc10", "data": "FAKE",
           "device": "NVIDIA H200", "peak": "H200 TF32 dense",
           "rows": [{"method": "bacon", "model": "ConvNet", "compile_s": 41.5,
                     "iteration_s": 0.25, "flops_per_iteration": 2.0e12,
                     "flops_per_s": 8.0e12, "of_peak": 8.0e12 / 494.7e12,
                     "peak_mem_bytes": 3 * 2**30}]}
EVAL = {"benchmark": "eval_speed", "config": "configs/cifar10.py:ipc10,method=bacon",
        "model": "ConvNet", "set_size": 400, "steps_per_epoch": 2, "device": "NVIDIA H200",
        "peak": "H200 TF32 dense",
        "rows": [{"num_eval": n, "compile_s": 5.0, "epoch_s": 0.01 * n, "flops_per_epoch": None,
                  "flops_per_s": None, "of_peak": None, "peak_mem_bytes": None}
                 for n in (1, 5)]}


def test_section_has_one_row_per_figure_and_appends(tmp_path):
    rows = _rows_module()
    (tmp_path / "d.json").write_text(json.dumps(DISTILL))
    (tmp_path / "e.json").write_text(json.dumps(EVAL))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n")
    rows.main([f"--distill={tmp_path / 'd.json'}", f"--eval={tmp_path / 'e.json'}",
               "--tests_rc=0", f"--results={results}", "--commit=abc1234"])
    text = results.read_text()
    assert text.startswith("# Measured results\n\n### Accelerator check, NVIDIA H200, ")
    assert "commit `abc1234`" in text and "exit status: 0" in text
    assert ("| BACON iteration (ConvNet) | 41.5 | 0.25 | 2000 G | 8 T | 1.6% | 3 GiB |"
            in text)
    assert "| evaluation epoch, 5 x ConvNet (400 images, 2 steps) | 5.0 | 0.05 | n/a |" in text


def test_a_failed_benchmark_is_a_row_saying_so(tmp_path):
    rows = _rows_module()
    text = rows.section(rows.load(str(tmp_path / "missing.json")), EVAL, "1", "abc1234")
    assert "| BACON iteration | failed: FileNotFoundError" in text
    assert "evaluation epoch, 1 x ConvNet" in text and "exit status: 1" in text
