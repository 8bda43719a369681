"""Shared helpers of the benchmark scripts: config loading, data (real or fake), device peaks,
XLA cost/memory analysis, timing and plain-text tables.

The benchmarks are scripts, not tests: they print figures and, where the issue defines a target,
`target (x): met` / `not met` / `n/a`, and never assert.
"""

import dataclasses
import functools
import os
import platform
import resource
import statistics
import time

import jax
import numpy as np

from bacon_jax import backend, config_lib, data, distill, models

# Training / test split sizes of each dataset, for fake data of the right size when the real data
# is not available (no TFDS here). Classes are balanced in the fake sets.
DATASET_SIZES = {
    "digits": (1257, 540),
    "mnist": (60000, 10000),
    "fashion_mnist": (60000, 10000),
    "svhn": (73257, 26032),
    "cifar10": (50000, 10000),
    "cifar100": (50000, 10000),
    "tiny_imagenet": (100000, 10000),
}

# Dense (no sparsity) per-device peaks in FLOP/s, from the vendors' data sheets. Keys are matched
# as substrings of `device.device_kind` (first match wins, so the specific names come first).
# 'tf32' is what XLA uses for float32 convolutions/matmuls on NVIDIA GPUs at JAX's default matmul
# precision; 'fp32' is the non-tensor-core figure (precision 'highest'). TPUs run float32
# convolutions as single bf16 passes at the default precision, so their entry is the bf16 peak.
DEVICE_PEAKS = (
    ("H100 PCIe", {"fp32": 51.2e12, "tf32": 378e12}),
    ("H100", {"fp32": 66.9e12, "tf32": 494.7e12}),  # SXM5
    ("H200", {"fp32": 66.9e12, "tf32": 494.7e12}),
    ("A100", {"fp32": 19.5e12, "tf32": 156e12}),
    ("TPU v4", {"bf16": 275e12}),
    ("TPU v5 lite", {"bf16": 197e12}),  # v5e reports itself as "TPU v5 lite"
    ("TPU v5e", {"bf16": 197e12}),
    ("TPU v5p", {"bf16": 459e12}),
    ("TPU v6 lite", {"bf16": 918e12}),  # v6e
)

GiB = 1024**3


# --------------------------------------------------------------------------------------------
# Configs and data.


# The refbench setting (../shared/refbench): MNIST IPC 10, BACON, ConvNetW32.
REFBENCH_CONFIG = "configs/mnist.py:ipc10,method=bacon,model=ConvNetW32"


def add_config_arguments(parser, default=REFBENCH_CONFIG):
    """--config (default: the refbench setting; required when `default` is None), --override K=V
    ... (repeatable), --fake_data."""
    if default is None:
        parser.add_argument("--config", required=True, help="config file and preset")
    else:
        parser.add_argument("--config", default=default,
                            help="config file and preset (default: the refbench setting)")
    parser.add_argument("--override", action="append", nargs="+", default=[], metavar="K=V",
                        help="config overrides appended to the config argument (repeatable)")
    parser.add_argument("--fake_data", choices=("auto", "true", "false"), default="auto")


def overrides_of(args):
    """The flat list of `--override` values of `add_config_arguments`."""
    return [override for group in args.override for override in group]


def load_config(config_flag, overrides=()):
    """Loads `path.py:arg` the way `--config` does, with `k=v` overrides appended to `arg`.

    The config file is loaded by path and `get_config(arg)` is called, exactly like
    ml_collections' `DEFINE_config_file`; putting the overrides into `arg` (not setting fields
    afterwards) lets `method=...` pick the method's reference defaults (config_lib.build).
    """
    path, _, arg = config_flag.partition(":")
    arg = ",".join(a for a in [arg, *overrides] if a)
    return config_lib.load_config_file(path, arg or None)


def fake_dataset(name, seed=0):
    """Random uint8 images with the dataset's shape, class count and split sizes (balanced)."""
    spec = data.DATASETS[name]
    num_train, num_test = DATASET_SIZES[name]
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n, dtype=np.int32) % spec.num_classes
        rng.shuffle(labels)
        return rng.integers(0, 256, (n,) + tuple(spec.image_shape), dtype=np.uint8), labels

    x_train, y_train = split(num_train)
    x_test, y_test = split(num_test)
    return data.Dataset(spec, x_train, y_train, x_test, y_test)


def load_data(config, fake_data="auto"):
    """(Dataset, description). fake_data: 'auto' (fake when loading fails), 'true' or 'false'."""
    name = config.dataset.name
    if fake_data != "true":
        try:
            dataset = data.load_dataset(config.dataset)
            return dataset, f"real ({config.dataset.source})"
        except Exception as e:  # Any failure to load means "use fake data" in 'auto' mode.
            if fake_data == "false":
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            dataset = fake_dataset(name)
            return dataset, f"FAKE random uint8 (loading failed: {reason})"
    return fake_dataset(name), "FAKE random uint8 (--fake_data=true)"


def mesh_for(num_devices):
    from bacon_jax import parallel

    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are visible.")
    return parallel.make_mesh(devices[:num_devices] if num_devices else devices)


def model_for(name, dataset_spec, spec):
    """The library's module for `name`, in the form `spec` runs it (fused ConvNet blocks or not)."""
    return models.get_model(name, dataset_spec.num_classes, dataset_spec.image_shape,
                            fused=spec.fused_blocks)


def jit(fn, spec, **kwargs):
    """`jax.jit(fn, **kwargs)` with the compile options `spec` (Distill/EvalSpec) asks for, as the
    library's own jits (backend.jit_options)."""
    return jax.jit(fn, compiler_options=backend.jit_options(spec.compiler_options), **kwargs)


def distill_setup(config, dataset, num_devices=1):
    """The engine as a run builds it: (spec, model, real, initial state, jitted `distill_step`).

    The step is `jax.jit` of `distill.distill_step` with the spec's compile options, not yet
    compiled; the state is `init_state` from `config.seed`.
    """
    spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size,
                                    mesh=mesh_for(num_devices))
    model = model_for(config.model, dataset.spec, spec)
    real = distill.real_data_from_dataset(dataset)
    state = jit(functools.partial(distill.init_state, model=model, spec=spec), spec)(
        jax.random.PRNGKey(config.seed), real)
    step = jit(functools.partial(distill.distill_step, model=model, spec=spec), spec)
    return spec, model, real, state, step


def write_json(path, record):
    """Writes a benchmark's figures as JSON (accelerator_check.sh collects them into RESULTS.md)."""
    import json  # pylint: disable=g-import-not-at-top

    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=float)


# --------------------------------------------------------------------------------------------
# Device, XLA analyses.


def device_peak(device=None, precision=None):
    """(peak FLOP/s, label) that applies to float32 inputs on `device`, or (None, 'n/a').

    Accelerators: the data-sheet figure (`DEVICE_PEAKS`). CPUs: no data sheet applies (a VM's
    cores, clocks and vector units vary), so the attainable rate is measured
    (`measured_cpu_peak`) and labelled as measured.
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        flops, size = measured_cpu_peak(device)
        return flops, f"measured: best float32 {size}x{size} matmul on this CPU"
    precision = precision or jax.config.jax_default_matmul_precision
    for name, peaks in DEVICE_PEAKS:
        if name.lower() in device.device_kind.lower():
            if "bf16" in peaks:
                if precision in (None, "default", "bfloat16"):
                    return peaks["bf16"], f"{name} bf16 dense"
                return None, "n/a (TPU at float32 precision)"
            if precision in ("highest", "float32"):
                return peaks["fp32"], f"{name} fp32"
            return peaks["tf32"], f"{name} TF32 dense"
    return None, "n/a"


def measured_cpu_peak(device=None, size=2048, repeats=10):
    """(FLOP/s, size): the best of `repeats` timed float32 size x size matmuls on a CPU device.

    Compiled with the library's CPU compile options (dots run in YNNPACK, as in the engine's
    programs), on all of the process's CPU threads. An attainable rate, not a theoretical peak: on
    the project's 2-core VM two `distill_speed.py` runs gave 176 and 188 GFLOP/s (RESULTS.md, "How
    much of this CPU the iteration uses").
    """
    device = device or jax.devices("cpu")[0]
    a, b = (jax.device_put(np.ones((size, size), np.float32), device) for _ in range(2))
    matmul = jax.jit(lambda a, b: a @ b,
                     compiler_options=backend.jit_options(backend.CPU_COMPILER_OPTIONS))
    return 2 * size**3 / min(call_seconds(matmul, a, b, repeats=repeats)), size


def is_gpu():
    return jax.default_backend() == "gpu"


def cost_flops(analysed):
    """'flops' of a Compiled or Lowered object's cost_analysis() (dict or list of dicts)."""
    try:
        cost = analysed.cost_analysis()
    except Exception:  # Some backends do not implement it.
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


@dataclasses.dataclass
class Memory:
    argument: int
    output: int
    temp: int
    alias: int

    @property
    def peak(self):
        # Donated inputs alias outputs and would otherwise be counted twice.
        return self.argument + self.output + self.temp - self.alias


def memory(compiled):
    """Per-device Memory of a compiled executable, or None when the backend gives none."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    return Memory(stats.argument_size_in_bytes, stats.output_size_in_bytes,
                  stats.temp_size_in_bytes, stats.alias_size_in_bytes)


def peak_rss_bytes():
    """This process's peak resident set size (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


# --------------------------------------------------------------------------------------------
# Timing and printing.


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def call_seconds(fn, *args, repeats=5):
    """Wall times of `repeats` calls of `fn(*args)` (outputs waited for) after an untimed one."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, *args, repeats=5):
    """Median wall time of `fn(*args)` over `repeats` calls after an untimed one."""
    return statistics.median(call_seconds(fn, *args, repeats=repeats))


def header(title):
    """Prints what the figures were measured on (the noise caveat included on CPU)."""
    device = jax.devices()[0]
    print(f"== {title}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} x "
          f"{device.device_kind}; host {platform.node()} with {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    if jax.default_backend() == "cpu":
        print("CPU timings are noisy when the host's cores are shared with other jobs; XLA:CPU "
              "figures say little about accelerators.")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print()


def fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def fmt_flops(n, unit="FLOP"):
    if n is None:
        return "n/a"
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def fmt_ratio(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def print_table(headers, rows):
    """A plain-text table with right-aligned columns."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()


def target(label, met, detail=""):
    """Prints `target (x): met|not met|<why n/a>` with the measured detail."""
    verdict = met if isinstance(met, str) else ("met" if met else "not met")
    print(f"target ({label}): {verdict}" + (f" -- {detail}" if detail else ""))
