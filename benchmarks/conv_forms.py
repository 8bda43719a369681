"""A 3x3 convolution as XLA's convolution vs as patches times a matrix, forward and backward.

    python benchmarks/conv_forms.py [--batch=256] [--shapes=16x128,8x128,16x32,8x32]

Issue 22 asked whether computing the width-128 ConvNet's convolutions as patches (the 9 shifted
copies of the input, concatenated) times the reshaped kernel, a dot that XLA:CPU hands to YNNPACK
under the run's compile options, beats XLA's own convolution. Per shape (HxC: an HxHxC input, C
output channels, SAME padding) it prints the median forward and forward+backward (the output and
`jax.vjp`'s gradients w.r.t. input and kernel) time of both forms, jitted with
`backend.CPU_COMPILER_OPTIONS` on CPU, and their largest difference. The default shapes are the
ConvNet's second and third convolutions on 32x32 inputs (CIFAR, and MNIST after the first conv's
padding of 3) at widths 128 and 32.
"""

import argparse
import sys

import jax
import jax.numpy as jnp

from bacon_jax import backend

import common


def conv_xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_patches(x, w):
    _, h, width, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + h, j:j + width, :]
                               for i in range(3) for j in range(3)], axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", patches, w.reshape(9 * c, -1))


def _forward_and_backward(conv, x, w, g):
    """The convolution's output and the gradients of <output, g> w.r.t. x and w."""
    y, vjp = jax.vjp(conv, x, w)
    return y, vjp(g)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shapes", default="16x128,8x128,16x32,8x32")
    args = parser.parse_args(argv)
    common.header("conv_forms " + " ".join(argv))
    options = backend.jit_options(backend.CPU_COMPILER_OPTIONS if backend.on_cpu() else ())
    rows = []
    for shape in args.shapes.split(","):
        size, channels = (int(v) for v in shape.split("x"))
        key_x, key_w, key_g = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(key_x, (args.batch, size, size, channels))
        w = 0.05 * jax.random.normal(key_w, (3, 3, channels, channels))
        g = jax.random.normal(key_g, (args.batch, size, size, channels))
        row = [f"{args.batch}x{size}x{size}x{channels}"]
        for conv in (conv_xla, conv_patches):
            forward = jax.jit(conv, compiler_options=options)
            # The output is returned too: without it XLA drops the forward convolution (the
            # vjp of a bilinear map needs only x and w), and the figure would be backward only.
            both = jax.jit(lambda x, w, g, conv=conv: _forward_and_backward(conv, x, w, g),
                           compiler_options=options)
            row += [f"{1000 * common.median_seconds(forward, x, w):.1f}",
                    f"{1000 * common.median_seconds(both, x, w, g):.1f}"]
        row.append(f"{float(jnp.max(jnp.abs(conv_xla(x, w) - conv_patches(x, w)))):.1e}")
        rows.append(row)
    common.print_table(["input", "conv fwd ms", "conv fwd+bwd ms", "patches fwd ms",
                        "patches fwd+bwd ms", "max |diff|"], rows)


if __name__ == "__main__":
    main(sys.argv[1:])
