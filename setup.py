"""Install bacon_jax: `pip install -e .` (library), `pip install -e .[test]` (with pytest), and
`pip install -e .[torch]` to read and write the PyTorch codebases' `.pt` sets."""

import setuptools

setuptools.setup(
    name="bacon_jax",
    version="0.1.0",
    description=(
        "Dataset distillation in JAX/Flax: BACON, IDM, DM and the CMI regularizer, "
        "with the field's evaluation protocol."
    ),
    packages=setuptools.find_packages(include=["bacon_jax", "bacon_jax.*"]),
    python_requires=">=3.10",
    # Ranges admit the CPU wheels CI installs (jax 0.10) and the CUDA/TPU builds
    # of jax 0.11 on accelerator machines. For GPU: pip install -U "jax[cuda12]".
    # Floors are tested versions: jax 0.8.0 with flax 0.11.2 and orbax-checkpoint 0.12.8 passed
    # tests/test_{distill,evaluation,parallel,losses,export,reevaluate}.py except
    # test_initial_state_has_the_type_of_a_step_output (where the step's outputs are placed).
    # jax 0.7.2 fails (NotImplementedError in the gradient under shard_map), and jax 0.6.2 fails
    # in orbax-checkpoint 0.11.40 and 0.12.8 alike.
    install_requires=[
        "jax>=0.8.0,<0.12",
        "flax>=0.11.2,<0.13",
        "optax>=0.2.4,<0.3",
        "chex>=0.1.88,<0.2",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml-collections>=0.1.1,<2",
        "tensorflow-datasets>=4.9.7,<5",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scikit-learn>=1.3",  # bundled 8x8 digits, the offline default dataset
        "Pillow>=10",  # PNG grids of synthetic images
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow (clu's writer needs TF)
        "safetensors>=0.4",  # the exact export of synthetic sets (its numpy API; no torch needed)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # Reading .pt / pickled sets of the PyTorch codebases and writing synthetic.pt. CPU wheels
        # suffice (tensors are only loaded and saved); CI installs torch==2.13.0.
        "torch": ["torch>=2.1,<3"],
    },
)
