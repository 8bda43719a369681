"""Networks of SPEC §2: the ConvNet family, the cross-architecture nets and a registry.

Every network maps NHWC float32 images to logits and is split into a feature extractor (`embed`) and
a final linear layer (`classify`), so that `logits == classify(embed(x))` exactly (SPEC §2.1). The
distillation engine needs both from ONE forward pass; it calls `features_and_logits`:

    features, logits = model.apply(variables, x, method="features_and_logits")

or, for nets that may carry BatchNorm state, the pure helper `apply_features_and_logits`, which
also returns the updated variables.

Parameters use PyTorch's default initialisation (SPEC §2.2, Appendix B): conv/linear weights and
biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm layers scale 1, bias 0, eps 1e-5, two-pass variance.

BatchNorm nets (names containing "BN") keep running statistics in the `batch_stats` collection,
initialised to mean 0 / var 1, with PyTorch momentum 0.1 (flax momentum 0.9). With `train=True` they
normalise with batch statistics and must be applied with `mutable=["batch_stats"]`; with
`train=False` they use the running statistics. All other nets have no `batch_stats` and ignore
`train`. Known deviation: flax updates the running variance with the biased batch variance, PyTorch
with the unbiased one (a factor n/(n-1), n = N*H*W per channel; under 1% for n >= 160).

Layout: `params = {"trunk": {...}, "classifier": {"kernel", "bias"}}` for every net.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bacon_jax import fused

Array = jax.Array
Initializer = Callable[..., Array]

# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in), i.e. PyTorch's kaiming_uniform with
# a = sqrt(5) (SPEC §2.2). Flax kernels are HWIO / (in, out), so fan_in is read correctly.
TORCH_KERNEL_INIT: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# PyTorch's eps for GroupNorm/LayerNorm/BatchNorm (flax defaults to 1e-6 for GN/LN, SPEC §2.2).
NORM_EPS = 1e-5

# PyTorch BatchNorm momentum 0.1 weights the NEW batch statistic; flax's momentum weights the OLD
# running value, hence 0.9 (SPEC §2.2).
BN_MOMENTUM = 0.9

ACTIVATIONS: Mapping[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "leakyrelu": functools.partial(nn.leaky_relu, negative_slope=0.01),
    "swish": nn.swish,  # x * sigmoid(x), the reference's Swish module.
}
NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
POOLINGS = ("avgpooling", "maxpooling", "none")


def torch_bias_init(fan_in: int) -> Initializer:
    """Returns PyTorch's default bias initializer U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Flax bias initializers only see the bias shape, not the layer's fan-in, so the bound is bound
    into the initializer when the layer knows its input size.

    Args:
        fan_in: number of inputs feeding one output unit (in_ch * kh * kw, or in_features).

    Returns:
        An initializer `(key, shape, dtype=float32) -> Array`.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _check_choice(kind: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


class Conv2d(nn.Module):
    """`torch.nn.Conv2d` semantics on NHWC inputs: symmetric integer padding, PyTorch init.

    Attributes:
        features: output channels.
        kernel_size: square kernel size.
        stride: square stride.
        padding: zero padding added on every side.
        use_bias: whether to add a bias (ResNet convs have none).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        in_ch = x.shape[-1]
        for size in x.shape[1:3]:
            if size + 2 * p < k:
                raise ValueError(
                    f"{x.shape[1]}x{x.shape[2]} feature map is too small for a {k}x{k} conv with "
                    f"padding {p}; the input image is too small for this architecture"
                )
        kernel, bias = _conv_params(self, k, in_ch, self.features, self.use_bias)
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(s, s), padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y if bias is None else y + bias


def _conv_params(module: nn.Module, k: int, in_ch: int, features: int,
                 use_bias: bool = True) -> tuple[Array, Array | None]:
    """Declares a conv's `kernel` (HWIO) and `bias` in `module` with PyTorch's initialisation."""
    kernel = module.param("kernel", TORCH_KERNEL_INIT, (k, k, in_ch, features), jnp.float32)
    if not use_bias:
        return kernel, None
    return kernel, module.param("bias", torch_bias_init(k * k * in_ch), (features,), jnp.float32)


class _ConvParams(nn.Module):
    """A `Conv2d`'s parameters without the conv, for blocks that apply them themselves."""

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, in_ch: int) -> tuple[Array, Array]:
        return _conv_params(self, self.kernel_size, in_ch, self.features)


class _NormParams(nn.Module):
    """An instance norm's `scale` (1) and `bias` (0), as `nn.GroupNorm` declares them."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        return scale, self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


class Linear(nn.Module):
    """`torch.nn.Linear` with PyTorch init; the fan-in is read from the input's last axis.

    Attributes:
        features: output size.
    """

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", TORCH_KERNEL_INIT, (fan_in, self.features), jnp.float32)
        bias = self.param("bias", torch_bias_init(fan_in), (self.features,), jnp.float32)
        return x @ kernel + bias


def _norm(x: Array, kind: str, train: bool, name: str | None = None) -> Array:
    """Applies the named norm layer (call from inside a compact method).

    `name` names an instance norm's module (the fused ConvNet blocks declare theirs by name).
    """
    if kind == "instancenorm":
        # The reference's GroupNorm(C, C): one group per channel, i.e. per-sample per-channel
        # statistics over H x W, biased variance (SPEC §2.1 item 2).
        return nn.GroupNorm(
            num_groups=None, group_size=1, epsilon=NORM_EPS, use_fast_variance=False, name=name
        )(x)
    if kind == "groupnorm":
        return nn.GroupNorm(num_groups=4, epsilon=NORM_EPS, use_fast_variance=False)(x)
    if kind == "layernorm":
        # torch LayerNorm([C, H, W], elementwise_affine=True): statistics AND affine over C, H, W.
        return nn.LayerNorm(
            epsilon=NORM_EPS, reduction_axes=(-3, -2, -1), feature_axes=(-3, -2, -1),
            use_fast_variance=False,
        )(x)
    if kind == "batchnorm":
        return nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=NORM_EPS,
            use_fast_variance=False,
        )(x)
    if kind == "none":
        return x
    raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")


def _pool(x: Array, kind: str) -> Array:
    """2x2 stride-2 pooling without padding (PyTorch floors odd sizes, as VALID does)."""
    if kind == "none":
        return x
    if min(x.shape[1:3]) < 2:
        raise ValueError(
            f"{x.shape[1]}x{x.shape[2]} feature map is too small for 2x2 pooling; "
            "the input image is too small for this architecture"
        )
    if kind == "avgpooling":
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    if kind == "maxpooling":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    raise ValueError(f"unknown pooling {kind!r}; allowed: {', '.join(POOLINGS)}")


def _flatten(x: Array) -> Array:
    # NHWC order instead of torch's CHW: every loss is invariant to a fixed feature permutation
    # and the classifier is freshly initialised i.i.d. (SPEC §2.1).
    return x.reshape(x.shape[0], -1)


class _FeatureClassifier(nn.Module):
    """Shared interface: a feature trunk followed by one `Linear` classifier.

    Subclasses implement `_make_trunk`, a module mapping `(x, train)` to flattened features.
    """

    num_classes: int

    def _make_trunk(self) -> nn.Module:
        raise NotImplementedError

    def setup(self) -> None:
        self.trunk = self._make_trunk()
        self.classifier = Linear(self.num_classes)

    def embed(self, x: Array, train: bool = False) -> Array:
        """Returns the classifier's input features.

        Args:
            x: images [N, H, W, C] in normalised space.
            train: BatchNorm mode (batch statistics when True); ignored by other nets.

        Returns:
            Features [N, D].
        """
        return self.trunk(x, train=train)

    def classify(self, features: Array) -> Array:
        """Applies the final linear layer to features from `embed`; returns logits [N, classes]."""
        return self.classifier(features)

    def features_and_logits(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        """Returns `(embed(x), classify(embed(x)))` from a single pass through the trunk."""
        features = self.embed(x, train=train)
        return features, self.classify(features)

    def __call__(self, x: Array, train: bool = False) -> Array:
        """Returns logits [N, num_classes] for images [N, H, W, C]."""
        return self.features_and_logits(x, train=train)[1]


class _ConvNetTrunk(nn.Module):
    width: int
    depth: int
    act: str
    norm: str
    pooling: str
    fused: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_choice("activation", self.act, tuple(ACTIVATIONS))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("pooling", self.pooling, POOLINGS)
        one_channel = x.shape[-1] == 1
        fusible = (self.norm, self.act, self.pooling) == ("instancenorm", "relu", "avgpooling")
        for d in range(self.depth):
            # Padding 3 on the first conv of 1-channel inputs: 28x28 digits get 32x32 geometry
            # (SPEC §2.1 item 1, A6).
            pad = 3 if (one_channel and d == 0) else 1
            kernel_shape = (3, 3, x.shape[-1], self.width)
            if self.fused and fusible and fused.supports(x.shape, kernel_shape, pad):
                # Same parameters (names, shapes, init) and maths as the branch below.
                kernel, conv_bias = _ConvParams(self.width, name=f"Conv2d_{d}")(x.shape[-1])
                scale, bias = _NormParams(self.width, name=f"GroupNorm_{d}")()
                x = fused.conv_norm_relu_pool(x, kernel, conv_bias, scale, bias, pad)
                continue
            x = Conv2d(self.width, 3, padding=pad, name=f"Conv2d_{d}")(x)
            x = _norm(x, self.norm, train, name=f"GroupNorm_{d}")
            x = ACTIVATIONS[self.act](x)
            x = _pool(x, self.pooling)
        return _flatten(x)


class ConvNet(_FeatureClassifier):
    """The distillation / default evaluation ConvNet of SPEC §2.1.

    Per block: Conv 3x3 (bias) -> norm -> activation -> 2x2 pooling; then Linear on the flattened
    map. D = width * (H'/2^depth) * (W'/2^depth), with H' = H + 4 for 1-channel inputs (e.g. 2048
    for 28x28x1 and 32x32x3, 8192 for 64x64x3, 128 for 8x8x1 at the default width/depth).

    Attributes:
        num_classes: number of output logits.
        width: channels of every conv.
        depth: number of conv blocks.
        act: "relu", "sigmoid", "leakyrelu" (slope 0.01) or "swish".
        norm: "instancenorm", "batchnorm", "layernorm", "groupnorm" (4 groups) or "none".
        pooling: "avgpooling", "maxpooling" or "none".
        fused: compute the instance norm + ReLU + average pool blocks with `fused.py` (same
            parameters and maths; faster on XLA:CPU). Other block kinds ignore it.
    """

    width: int = 128
    depth: int = 3
    act: str = "relu"
    norm: str = "instancenorm"
    pooling: str = "avgpooling"
    fused: bool = False

    def _make_trunk(self) -> nn.Module:
        return _ConvNetTrunk(self.width, self.depth, self.act, self.norm, self.pooling,
                             self.fused)


class _MLPTrunk(nn.Module):
    hidden: int = 128

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        x = nn.relu(Linear(self.hidden)(_flatten(x)))
        return nn.relu(Linear(self.hidden)(x))


class MLP(_FeatureClassifier):
    """SPEC §2.3 MLP: flatten -> 128 -> ReLU -> 128 -> ReLU -> classes.

    The first layer's size follows the input (784 at 28x28x1, 3072 at 32x32x3). `embed` is the
    128-d output of the second ReLU (the reference defines no embed for the MLP).
    """

    def _make_trunk(self) -> nn.Module:
        return _MLPTrunk()


class _LeNetTrunk(nn.Module):
    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        x = Conv2d(6, 5, padding=2 if x.shape[-1] == 1 else 0)(x)
        x = _pool(nn.relu(x), "maxpooling")
        x = Conv2d(16, 5, padding=0)(x)
        x = _pool(nn.relu(x), "maxpooling")
        x = nn.relu(Linear(120)(_flatten(x)))
        return nn.relu(Linear(84)(x))


class LeNet(_FeatureClassifier):
    """SPEC §2.3 LeNet (no norm). `embed` is the 84-d output of the last hidden ReLU.

    The first FC layer sees 16*5*5 inputs at 28x28x1 / 32x32x3 and 16*13*13 at 64x64x3 (A7).
    """

    def _make_trunk(self) -> nn.Module:
        return _LeNetTrunk()


class _AlexNetTrunk(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        # (features, kernel, padding, pool after): padding 4 on the first conv of 1-channel
        # inputs gives 28x28 the 32x32 geometry (SPEC §2.3).
        first_pad = 4 if x.shape[-1] == 1 else 2
        layers = ((128, 5, first_pad, True), (192, 5, 2, True), (256, 3, 1, False),
                  (192, 3, 1, False), (192, 3, 1, True))
        for features, kernel, pad, pool in layers:
            x = Conv2d(features, kernel, padding=pad)(x)
            x = nn.relu(_norm(x, self.norm, train))
            if pool:
                x = _pool(x, "maxpooling")
        return _flatten(x)


class AlexNet(_FeatureClassifier):
    """SPEC §2.3 AlexNet (norm "none") / AlexNetBN (norm "batchnorm" after every conv).

    D = 192*4*4 at 28x28x1 / 32x32x3 and 192*8*8 at 64x64x3 (A7).

    Attributes:
        norm: "none" or "batchnorm".
    """

    norm: str = "none"

    def _make_trunk(self) -> nn.Module:
        return _AlexNetTrunk(self.norm)


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class _VGGTrunk(nn.Module):
    cfg: tuple[int | str, ...]
    norm: str

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        one_channel = x.shape[-1] == 1
        for i, item in enumerate(self.cfg):
            if item == "M":
                x = _pool(x, "maxpooling")
            else:
                pad = 3 if (one_channel and i == 0) else 1
                x = Conv2d(int(item), 3, padding=pad)(x)
                x = nn.relu(_norm(x, self.norm, train))
        # The reference's trailing AvgPool2d(1) is the identity and is omitted.
        return _flatten(x)


class VGG11(_FeatureClassifier):
    """SPEC §2.3 VGG11 with instance norm (`VGG11`) or BatchNorm (`VGG11BN`).

    D = 512 at 28x28x1 / 32x32x3; at 64x64x3 the final map is 2x2, so D = 2048 (A7: the flatten
    is kept, the classifier grows).

    Attributes:
        norm: "instancenorm" or "batchnorm".
    """

    norm: str = "instancenorm"

    def _make_trunk(self) -> nn.Module:
        return _VGGTrunk(VGG11_CFG, self.norm)


class _BasicBlock(nn.Module):
    planes: int
    stride: int
    norm: str
    avgpool_downsample: bool

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        # The _AP variant (ResNet18BN_AP) replaces each stride-2 conv by a stride-1 conv followed
        # by 2x2 average pooling, in both paths (SPEC §2.3).
        conv_stride = 1 if self.avgpool_downsample else self.stride
        out = Conv2d(self.planes, 3, stride=conv_stride, padding=1, use_bias=False)(x)
        out = nn.relu(_norm(out, self.norm, train))
        if self.avgpool_downsample and self.stride != 1:
            out = _pool(out, "avgpooling")
        out = Conv2d(self.planes, 3, stride=1, padding=1, use_bias=False)(out)
        out = _norm(out, self.norm, train)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = Conv2d(self.planes, 1, stride=conv_stride, padding=0, use_bias=False)(x)
            if self.avgpool_downsample and self.stride != 1:
                shortcut = _pool(shortcut, "avgpooling")
            shortcut = _norm(shortcut, self.norm, train)
        return nn.relu(out + shortcut)


class _ResNetTrunk(nn.Module):
    norm: str
    avgpool_downsample: bool
    stage_blocks: tuple[int, ...] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = Conv2d(64, 3, stride=1, padding=1, use_bias=False)(x)
        x = nn.relu(_norm(x, self.norm, train))
        for stage, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), self.stage_blocks)):
            for b in range(num_blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                x = _BasicBlock(planes, stride, self.norm, self.avgpool_downsample)(x, train=train)
        if self.avgpool_downsample:
            # ResNet18BN_AP has no global pooling: D = 512*4*4 (32px), 512*3*3 (28px).
            return _flatten(x)
        # The reference's avg_pool2d(4) sees a 4x4 map at 28/32 px, i.e. it is a global average.
        # We keep "global average" at every size (8x8 map at 64 px), so the embedding is always
        # 512-d, as the CMI teacher needs (SPEC §7.1, A7, A8).
        return jnp.mean(x, axis=(1, 2))


class ResNet18(_FeatureClassifier):
    """SPEC §2.3 ResNet18 (BasicBlocks [2,2,2,2], widths 64-512).

    `embed` is the 512-d globally averaged map after the final ReLU (the CMI teacher's embedding,
    SPEC §7.1); for `avgpool_downsample=True` (ResNet18BN_AP) it is the flattened final map.

    Attributes:
        norm: "instancenorm" (ResNet18) or "batchnorm" (ResNet18BN, ResNet18BN_AP).
        avgpool_downsample: the _AP variant (stride-1 conv + 2x2 avg-pool, no global pooling).
    """

    norm: str = "instancenorm"
    avgpool_downsample: bool = False

    def _make_trunk(self) -> nn.Module:
        return _ResNetTrunk(self.norm, self.avgpool_downsample)


def _convnet(**overrides: Any) -> Callable[[int], nn.Module]:
    return lambda num_classes: ConvNet(num_classes, **overrides)


# Names of get_network (SPEC §2.1, §2.3) -> constructor taking num_classes.
_REGISTRY: Mapping[str, Callable[[int], nn.Module]] = {
    "ConvNet": _convnet(),
    # W8/W16 are not reference nets: tiny widths for tests and CPU smoke runs.
    "ConvNetW8": _convnet(width=8),
    "ConvNetW16": _convnet(width=16),
    "ConvNetW32": _convnet(width=32),
    "ConvNetW64": _convnet(width=64),
    "ConvNetW128": _convnet(width=128),
    "ConvNetW256": _convnet(width=256),
    "ConvNetD1": _convnet(depth=1),
    "ConvNetD2": _convnet(depth=2),
    "ConvNetD3": _convnet(depth=3),
    "ConvNetD4": _convnet(depth=4),
    "ConvNetAS": _convnet(act="sigmoid"),
    "ConvNetAR": _convnet(act="relu"),
    "ConvNetAL": _convnet(act="leakyrelu"),
    "ConvNetASwish": _convnet(act="swish"),
    "ConvNetASwishBN": _convnet(act="swish", norm="batchnorm"),
    "ConvNetNN": _convnet(norm="none"),
    "ConvNetBN": _convnet(norm="batchnorm"),
    "ConvNet_BN": _convnet(norm="batchnorm"),  # the reference's alias of ConvNetBN
    "ConvNetLN": _convnet(norm="layernorm"),
    "ConvNetIN": _convnet(norm="instancenorm"),
    "ConvNetGN": _convnet(norm="groupnorm"),
    "ConvNetNP": _convnet(pooling="none"),
    "ConvNetMP": _convnet(pooling="maxpooling"),
    "ConvNetAP": _convnet(pooling="avgpooling"),
    "MLP": MLP,
    "LeNet": LeNet,
    "AlexNet": lambda num_classes: AlexNet(num_classes, norm="none"),
    "AlexNetBN": lambda num_classes: AlexNet(num_classes, norm="batchnorm"),
    "VGG11": lambda num_classes: VGG11(num_classes, norm="instancenorm"),
    "VGG11BN": lambda num_classes: VGG11(num_classes, norm="batchnorm"),
    "ResNet18": lambda num_classes: ResNet18(num_classes, norm="instancenorm"),
    "ResNet18BN": lambda num_classes: ResNet18(num_classes, norm="batchnorm"),
    "ResNet18BN_AP": lambda num_classes: ResNet18(
        num_classes, norm="batchnorm", avgpool_downsample=True
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# get_eval_pool of B/I (SPEC §2.3). 'M' is B/I's list, not CMIDD's shorter one. 'S' is what B/I get
# for `get_eval_pool(mode, 'ConvNet', 'ConvNet')`; 'SS' and "other" depend on the run's model and
# are left to the caller.
EVAL_POOLS: Mapping[str, tuple[str, ...]] = {
    "M": ("MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"),
    "B": ("ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN"),
    "W": ("ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"),
    "D": ("ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"),
    "A": ("ConvNetAS", "ConvNetAR", "ConvNetAL", "ConvNetASwish"),
    "P": ("ConvNetNP", "ConvNetMP", "ConvNetAP"),
    "N": ("ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"),
    "S": ("ConvNet",),
}


def get_model(name: str, num_classes: int, image_shape: Sequence[int],
              fused: bool = False) -> nn.Module:
    """Builds a registered network.

    Layer sizes follow the input (A7), so the module itself is shape-agnostic; `image_shape` is
    validated here so a bad shape fails early rather than at the first `init`.

    Args:
        name: one of `MODEL_NAMES`.
        num_classes: number of output logits.
        image_shape: (H, W, C) of the inputs.
        fused: for ConvNets, compute the instance-norm blocks with `fused.py` (same parameters and
            maths; what `backend.fused_blocks` picks on CPU). Ignored by other networks.

    Returns:
        An unbound flax module whose `__call__(x, train=False)` gives logits.

    Raises:
        ValueError: for an unknown name or a malformed image shape.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    model = _REGISTRY[name](num_classes)
    return model.clone(fused=True) if fused and isinstance(model, ConvNet) else model


def init_model(model: nn.Module, key: Array, image_shape: Sequence[int]) -> dict[str, Any]:
    """Initialises a network's variables for inputs of shape (H, W, C).

    Pure in `key`, so stacks of nets come from `jax.vmap(lambda k: init_model(model, k, shape))`.

    Args:
        model: a module from `get_model` (or any `_FeatureClassifier`).
        key: PRNG key.
        image_shape: (H, W, C).

    Returns:
        `{'params': ...}`, plus `'batch_stats'` (mean 0, var 1) for BatchNorm nets.
    """
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return dict(model.init(key, dummy, train=False))


def ignores_input(model: nn.Module, variables: Mapping[str, Any], inputs: Array,
                  method: Any = None) -> bool:
    """Whether `model.apply(variables, inputs)` (or `method`) gives one output for every row."""
    kwargs = {} if method is None else {"method": method}
    outputs = model.apply(variables, inputs, train=False, **kwargs)
    return float(jnp.max(jnp.std(outputs, axis=0))) == 0.0


def check_architecture(name: str, num_classes: int, image_shape: Sequence[int]) -> None:
    """Raises a ValueError naming `name` when that network cannot learn from images of this shape.

    Two cases, both caught before any training is spent on the network:
    * it cannot be built: the image is too small for its pooling stages (VGG11 or LeNet on 8x8);
    * it ignores its input: the instance-norm ResNet18 on 8x8 images (digits) reaches a 1x1 map in
      its last stage, where instance norm outputs exactly its bias, so the logits are the same for
      every input and the network scores chance whatever it trains on (checked on a few random
      inputs).
    """
    model = get_model(name, num_classes, image_shape)
    try:
        variables = init_model(model, jax.random.PRNGKey(0), image_shape)
    except ValueError as error:
        raise ValueError(
            f"Architecture {name!r} cannot take images of shape {tuple(image_shape)}: {error}."
        ) from None
    inputs = jax.random.normal(jax.random.PRNGKey(1), (4, *image_shape))
    if ignores_input(model, variables, inputs):
        raise ValueError(
            f"Architecture {name!r} gives the same output for every input of shape "
            f"{tuple(image_shape)} (e.g. instance norm on a 1x1 final map), so it cannot learn at "
            "this image size. Choose another architecture, e.g. its BatchNorm variant "
            "(ResNet18BN) or a ConvNet."
        )


def apply_features_and_logits(
    model: nn.Module, variables: Mapping[str, Any], x: Array, *, train: bool = False
) -> tuple[Array, Array, dict[str, Any]]:
    """Features and logits from one forward pass, threading BatchNorm state.

    Args:
        model: a module from `get_model`.
        variables: its variables (from `init_model`).
        x: images [N, H, W, C].
        train: BatchNorm mode. When True and the net has `batch_stats`, the running statistics
            are updated and returned; otherwise `variables` comes back unchanged.

    Returns:
        (features [N, D], logits [N, num_classes], variables).
    """
    if train and "batch_stats" in variables:
        (features, logits), updates = model.apply(
            variables, x, train=True, method="features_and_logits", mutable=["batch_stats"]
        )
        return features, logits, {**variables, **updates}
    features, logits = model.apply(variables, x, train=train, method="features_and_logits")
    return features, logits, dict(variables)


def eval_pool(mode: str) -> tuple[str, ...]:
    """Returns the architecture names evaluated for an eval mode (SPEC §2.3 `get_eval_pool`).

    Args:
        mode: one of the keys of `EVAL_POOLS`.

    Raises:
        ValueError: for an unknown mode.
    """
    if mode not in EVAL_POOLS:
        raise ValueError(f"unknown eval mode {mode!r}; allowed: {', '.join(EVAL_POOLS)}")
    return EVAL_POOLS[mode]
