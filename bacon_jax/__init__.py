"""bacon_jax: dataset distillation (BACON, IDM, DM, CMI) in JAX/Flax.

`bacon_jax.load_synthetic(path_or_workdir)` reads a distilled set exported by a run
(`exp{e}/synthetic.npz`) as a `SyntheticSet` pytree (see export.py).
"""

__all__ = ["SyntheticSet", "load_synthetic"]


def __getattr__(name):
    # Imported on first use: config files import bacon_jax.config_lib, which should stay cheap.
    if name in __all__:
        from bacon_jax import export  # pylint: disable=g-import-not-at-top

        return getattr(export, name)
    raise AttributeError(f"module 'bacon_jax' has no attribute {name!r}")
