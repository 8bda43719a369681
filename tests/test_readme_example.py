"""The README's "Using the engine in your own code" block runs as written and does what it says.

It runs in a fresh interpreter on one CPU device, as a reader would run it (the suite's 8 fake
devices would make every replicated array's computation run 8 times on the CI machine's 2 cores).
"""

import pathlib
import re
import subprocess
import sys

from tests.subprocess_env import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = "<!-- engine-example -->"
# Printed after the example, from its variables.
CHECKS = '''
import numpy as np
assert spec.method == "bacon" and int(state.step) == 3, (spec.method, state.step)
expected = {"loss", "match_loss", "ce_loss", "cmi_loss", "ce_multiplier", "image_rms", "pool_size"}
assert set(metrics) == expected, sorted(metrics)
assert images.shape == (4 * 100, 8, 8, 1), images.shape  # 10 classes x IPC 10, expanded x4
assert np.asarray(accuracies).shape == (2,), accuracies
print("CHECKED", float(np.min(accuracies)), int(correct) / dataset.num_test)
'''


def readme_example():
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md has no python block after {MARKER}"
    return match.group(1)


def test_readme_engine_example_runs():
    env = subprocess_env(PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", readme_example() + CHECKS], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum("'match_loss'" in line for line in lines) == 3  # one metrics line per step
    min_accuracy, own_accuracy = map(float, lines[-1].split()[1:])
    # Well above chance (0.1): 11 protocol epochs on the x4 set, and 20 full-batch steps.
    assert min_accuracy > 0.3 and own_accuracy > 0.2, lines[-1]
