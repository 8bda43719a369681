"""bacon_jax: dataset distillation (BACON, IDM, DM, CMI) in JAX/Flax."""
