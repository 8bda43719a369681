"""Per-backend forms of the same computation: what each XLA backend runs fastest, same maths.

Every choice below is a config field whose default `'auto'` picks the form for the backend the run
uses (XLA:CPU or an accelerator); `'true'`/`'false'` (or a bool) forces it. The forms compute the
same functions up to float round-off (tests compare them), so results depend on config and seed
only, never on which form ran.

| field            | on CPU (`auto`)                           | why                                       |
|------------------|-------------------------------------------|-------------------------------------------|
| `unroll_loops`   | short inner loops unrolled at trace time  | XLA:CPU runs convolutions inside `while`  |
|                  | (pool steps, minibatches, chunks), epoch  | loops ~20x slower (jax-ml/jax#12868)      |
|                  | loop driven from Python                   |                                           |
| `fused_blocks`   | ConvNet blocks from `fused.py`            | op-by-op, XLA:CPU spends most of a step   |
|                  |                                           | in the norm's memory passes and in the    |
|                  |                                           | first conv's weight gradient              |
| `compiler_options` | `CPU_COMPILER_OPTIONS`                  | XLA:CPU's default library fusions slow    |
|                  |                                           | the fused blocks' loops and convolutions  |
|                  |                                           | (see the constant)                        |

Accelerators get the compact forms (loops as loops, op-by-op blocks, default compiler options).
"""

import functools
import inspect

import jax

# XLA:CPU compile options for `compiler_options='auto'` (passed per jit, not through XLA_FLAGS):
# hand only dots to the YNNPACK library. Measured on the project's 2-core machine (jax 0.10.2,
# ConvNetW32 training step, batch 256): XLA's default library fusions make the fused blocks'
# elementwise and reduction loops ~3x slower; YNNPACK convolutions do not use the second core
# (a 16x16x32 conv: 13.6 ms on one core or two) where XLA's own run in 8.2 ms, and its
# weight-gradient convolutions are up to 8x slower. Dots are faster in YNNPACK (9.1 vs 13.6 ms).
CPU_COMPILER_OPTIONS = (
    ("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),
)

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def on_cpu():
    """Whether the default backend is XLA:CPU."""
    return jax.default_backend() == "cpu"


def auto_flag(config, field):
    """The bool of an `'auto'`/true/false config field: `'auto'` means "on CPU only"."""
    choice = config.get(field, "auto")
    if isinstance(choice, bool):
        return choice
    text = str(choice).strip().lower()
    if text == "auto":
        return on_cpu()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"Unknown {field} {choice!r}; allowed: auto, true, false.")


def unroll_loops(config):
    """config.unroll_loops: unroll short inner loops (CPU) or keep them as loops."""
    return auto_flag(config, "unroll_loops")


def fused_blocks(config):
    """config.fused_blocks: ConvNet instance-norm blocks from `fused.py` (CPU) or op by op."""
    return auto_flag(config, "fused_blocks")


def compiler_options(config):
    """config.compiler_options as a hashable tuple of (option, value) pairs for `jax.jit`.

    `'auto'`: `CPU_COMPILER_OPTIONS` on CPU, none elsewhere; `'none'`: none; or explicit
    `'option=value;option=value'` (XLA debug options, e.g. for benchmarks).
    """
    choice = str(config.get("compiler_options", "auto")).strip()
    if choice.lower() == "auto":
        return CPU_COMPILER_OPTIONS if on_cpu() else ()
    if choice.lower() in ("none", ""):
        return ()
    pairs = []
    for item in choice.split(";"):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"compiler_options {choice!r}: expected 'auto', 'none' or "
                             "'option=value;option=value'.")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def jit_options(options):
    """The `compiler_options` argument of `jax.jit` for a tuple of pairs (None when empty)."""
    if not options:
        return None
    def parse(value):
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        return int(value) if value.lstrip("-").isdigit() else value

    return {name: parse(value) for name, value in options}


def jit_by_spec(**jit_kwargs):
    """Decorator: `jax.jit(fn, **jit_kwargs)` compiled with the options of its `spec` argument.

    `spec` (a DistillSpec or EvalSpec, static) carries `compiler_options`; one jitted function is
    kept per distinct options tuple. The wrapper also has `.lower(...)` like a jitted function.
    """
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.lru_cache(maxsize=None)
        def jitted(options):
            return jax.jit(fn, compiler_options=jit_options(options), **jit_kwargs)

        def pick(args, kwargs):
            return jitted(signature.bind(*args, **kwargs).arguments["spec"].compiler_options)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return pick(args, kwargs)(*args, **kwargs)

        call.lower = lambda *args, **kwargs: pick(args, kwargs).lower(*args, **kwargs)
        return call

    return decorate
