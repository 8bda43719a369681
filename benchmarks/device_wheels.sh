#!/usr/bin/env bash
# Fills .whl/ with the packages bacon_jax needs that the GPU machine's image lacks (issue 22).
#
#   bash benchmarks/device_wheels.sh       # here, from the repository root, before the first GPU call
#
# The device machine (Python 3.12, x86-64, no package registry) already has jax, flax, optax, chex,
# orbax-checkpoint, scikit-learn, absl-py, protobuf, psutil, pyarrow, requests, tqdm, wrapt, etils,
# PyYAML, Pillow, safetensors, pytest and pytest-xdist (/work/.library/device/KINDS.md). Missing:
# ml-collections, tensorflow-datasets and the parts of its import chain the image lacks, and
# tensorboardX. This downloads them as wheels for CPython 3.12 on manylinux x86-64 (pure-Python
# sdists are built into wheels here), at the versions the test suite runs with. The wheels then
# travel with the working tree (`carry: [".whl"]`, 64 MiB limit; these are ~8 MiB) and
# `benchmarks/accelerator_check.sh` installs them into /tmp/site. `.whl/` is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  ml_collections==1.1.0
  tensorflow_datasets==4.9.10
  array_record==0.8.6
  dm-tree==0.1.10
  immutabledict==4.3.1
  promise==2.3
  simple-parsing==0.1.9
  docstring_parser==0.18.0
  tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0
  termcolor==3.3.0
  toml==0.10.2
  tensorboardX==2.6.5
)
PLATFORMS=()
for n in 2_28 2_27 2_17 2_5 1 2014; do
  case "$n" in 1|2014) PLATFORMS+=(--platform "manylinux${n}_x86_64") ;;
                   *) PLATFORMS+=(--platform "manylinux_${n}_x86_64") ;; esac
done
rm -rf .whl && mkdir -p .whl
for package in "${PACKAGES[@]}"; do
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]}" -d .whl "$package" 2>/dev/null; then
    # No wheel published (an sdist only): build a pure-Python wheel here.
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$package"
  fi
done
ls -l .whl
du -sh .whl
