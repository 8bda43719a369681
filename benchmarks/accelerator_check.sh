#!/usr/bin/env bash
# The first thing a session with a GPU runs (issue 22): installs bacon_jax on the device machine,
# runs a short correctness subset of the tests on the GPU, then times one BACON iteration and one
# evaluation epoch at the CIFAR-10 IPC 10 reference settings (random data of CIFAR-10's shape: speed
# does not depend on pixel values) and appends the figures to RESULTS.md.
#
#   bash benchmarks/accelerator_check.sh            # from the repository root, on the GPU machine
#
# Budget: under 8 minutes on one H100/H200 (each phase has its own timeout below, 7 min in all).
# Prints compile times, seconds per iteration / epoch, FLOP/s and % of the device's peak
# (benchmarks/README.md, "FLOP counts and device peaks"). Everything it prints and writes also
# goes to $OUT (the device tool's return folder) when set, else /tmp/accelerator_check: the log,
# the JSON figures and the updated RESULTS.md, to copy back into the checkout.
#
# Packages the device machine lacks (ml-collections, tensorflow-datasets and parts of its import
# chain, tensorboardX) travel as wheels in .whl/: run `bash benchmarks/device_wheels.sh` here first
# and name `.whl` in the device call's `carry`; when .whl/ exists they are installed into /tmp/site.
# Rehearsed on CPU in a Python 3.12 environment holding only the image's packages (benchmarks/README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/accelerator_check}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/accelerator_check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
unset XLA_FLAGS JAX_PLATFORMS  # the real devices, not the tests' fake CPU ones
began=$(date +%s)
phase() { echo; echo "== $1 ($(( $(date +%s) - began )) s)"; }

phase "install"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
python3 -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'flax', flax.__version__, \
jax.default_backend(), jax.devices())" || exit 1

phase "correctness subset on the GPU (float32 at full precision, as on CPU)"
# The tests compare forms of the same maths with CPU-sized tolerances; TF32 would exceed them.
# Four pytest workers share the GPU (no preallocation) so that compiling, the subset's main cost
# (4 min on one process of the 2-core CPU machine), uses the host's cores.
XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 \
  python3 -m pytest -q -x -n 4 -p no:cacheprovider \
  tests/test_losses.py tests/test_augment.py tests/test_fused.py tests/test_evaluation.py
tests_rc=$?
echo "tests exit status: $tests_rc"

phase "BACON iteration, CIFAR-10 IPC 10 (reference settings, ConvNet width 128)"
timeout 150 python3 benchmarks/distill_speed.py --config=configs/cifar10.py:ipc10 \
  --methods=bacon --iters=5 --warmup=2 --fake_data=true --yardstick=false \
  --json="$OUT_DIR/distill_speed.json"
distill_rc=$?

phase "evaluation epoch, CIFAR-10 IPC 10 BACON set (x4 expansion), 1 and 5 networks"
timeout 120 python3 benchmarks/eval_speed.py --config=configs/cifar10.py:ipc10,method=bacon \
  --num_eval=1,5 --epochs=10 --warmup=2 --json="$OUT_DIR/eval_speed.json"
eval_rc=$?

phase "RESULTS.md rows"
python3 benchmarks/accelerator_rows.py --distill="$OUT_DIR/distill_speed.json" \
  --eval="$OUT_DIR/eval_speed.json" --tests_rc="$tests_rc" --results=RESULTS.md
cp RESULTS.md "$OUT_DIR/RESULTS.md"
echo "statuses: tests $tests_rc, distill $distill_rc, eval $eval_rc; $(( $(date +%s) - began )) s"
[ "$tests_rc" = 0 ] && [ "$distill_rc" = 0 ] && [ "$eval_rc" = 0 ]
