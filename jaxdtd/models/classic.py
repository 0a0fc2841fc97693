"""Classic image classifiers as Flax linen modules: LeNet, VGG16, ResNet18/50 and an Inception net.

Every model takes NHWC images and returns logits of shape ``(N, num_classes)``.  BatchNorm layers
run in inference mode (running statistics) unless ``train=True``; that is the mode to explain in,
because jaxdtd folds an inference-mode BatchNorm into the convolution before it (docs/rules.md):
``s = scale / sqrt(var + eps)``, ``W' = W * s``, ``b' = (b - mean) * s + shift``.  In training mode
the normalisation divides by statistics of the batch itself, which is not an affine layer.

``width`` shrinks the channel counts for tests and benchmarks, e.g.::

    import jax, jax.numpy as jnp
    from jaxdtd.models.classic import ResNet18

    model = ResNet18(num_classes=10, width=8)            # torchvision layout, 8 base channels
    x = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)     # {'params': ..., 'batch_stats': ...}
    logits = model.apply(variables, x)                   # (2, 10)

Padding follows torchvision (symmetric, ``kernel // 2``), not Flax's ``"SAME"`` (which pads a
strided convolution of an even-sized input only at the end), so weights converted from torchvision
give the same outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "InceptionBlock",
    "InceptionNet",
    "LeNet",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "VGG16",
]


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    # torch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5), so converted statistics behave alike
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _global_average_pool(x: jnp.ndarray) -> jnp.ndarray:
    # a reduce_sum (relevance: Norm) followed by a division by a constant (Pass)
    return jnp.mean(x, axis=(1, 2))


class LeNet(nn.Module):
    """LeNet-5 layout with ReLU and max pooling for 28x28 or 32x32 images (any number of channels).

    conv 5x5 (6) -> ReLU -> maxpool 2 -> conv 5x5 (16) -> ReLU -> maxpool 2 -> flatten (5x5x16)
    -> dense 120 -> ReLU -> dense 84 -> ReLU -> dense ``num_classes``.  A 28x28 input (MNIST) is
    zero-padded by 2 in the first convolution, so both sizes reach the dense layers as 5x5x16.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        size = tuple(x.shape[1:3])
        if size not in ((28, 28), (32, 32)):
            raise ValueError(f"LeNet expects 28x28 or 32x32 images (NHWC), got spatial size {size}")
        pad = (32 - size[0]) // 2
        x = nn.Conv(6, (5, 5), padding=((pad, pad), (pad, pad)), name="conv1")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


_VGG16_FEATURES: tuple[int | Literal["M"], ...]  # channels of each convolution, "M" a 2x2 max pool
_VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG16 (configuration D): 13 conv 3x3 + ReLU in five stages with 2x2 max pooling, then 3 dense.

    ``width`` multiplies every channel count and the hidden size (4096), e.g. ``width=1/16`` gives
    channels 4..32 and 256 hidden units.  ``batch_norm=True`` inserts a BatchNorm after each
    convolution (torchvision's ``vgg16_bn``; the convolutions keep their bias, which the folding
    merges too).  Dropout is left out: the model is meant for explanation, i.e. inference.

    Small inputs: instead of torchvision's adaptive 7x7 average pool and a 7*7*512 flatten, the
    feature map after the fifth pool is averaged globally (``jnp.mean`` over H, W), so any input
    of at least 32x32 works (32x32 reaches the head as 1x1).  With 224x224 images this differs from
    torchvision only in averaging the 7x7 map instead of flattening it.
    """

    num_classes: int = 1000
    width: float = 1.0
    batch_norm: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if min(x.shape[1:3]) < 32:
            raise ValueError(f"VGG16 needs inputs of at least 32x32 (five 2x2 pools), got {x.shape[1:3]}")
        index = 0
        for item in _VGG16_FEATURES:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.Conv(_scaled(item, self.width), (3, 3), padding=_padding(3), name=f"conv{index}")(x)
            if self.batch_norm:
                x = _batch_norm(self.train, f"bn{index}")(x)
            x = nn.relu(x)
            index += 1
        x = _global_average_pool(x)
        hidden = _scaled(4096, self.width)
        x = nn.relu(nn.Dense(hidden, name="fc1")(x))
        x = nn.relu(nn.Dense(hidden, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 conv (stride ``strides``) + BN when the shape changes.
    The sum of the two branches is an add of two data values: jaxdtd gives it the Norm rule.
    """

    features: int
    strides: int = 1
    train: bool = False
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(nn.Conv, use_bias=False)
        s = (self.strides, self.strides)
        y = conv(self.features, (3, 3), strides=s, padding=_padding(3), name="conv1")(x)
        y = nn.relu(_batch_norm(self.train, "bn1")(y))
        y = conv(self.features, (3, 3), padding=_padding(3), name="conv2")(y)
        y = _batch_norm(self.train, "bn2")(y)
        residual = x
        if self.strides != 1 or x.shape[-1] != self.features:
            residual = conv(self.features, (1, 1), strides=s, padding="VALID", name="shortcut_conv")(x)
            residual = _batch_norm(self.train, "shortcut_bn")(residual)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """ResNet bottleneck (torchvision v1.5, stride on the 3x3): 1x1 -> 3x3 -> 1x1 (4x ``features``),
    each followed by BN, ReLU between, the shortcut (identity or 1x1 conv + BN) added before the last ReLU."""

    features: int
    strides: int = 1
    train: bool = False
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(nn.Conv, use_bias=False)
        s = (self.strides, self.strides)
        out = self.features * self.expansion
        y = conv(self.features, (1, 1), padding="VALID", name="conv1")(x)
        y = nn.relu(_batch_norm(self.train, "bn1")(y))
        y = conv(self.features, (3, 3), strides=s, padding=_padding(3), name="conv2")(y)
        y = nn.relu(_batch_norm(self.train, "bn2")(y))
        y = conv(out, (1, 1), padding="VALID", name="conv3")(y)
        y = _batch_norm(self.train, "bn3")(y)
        residual = x
        if self.strides != 1 or x.shape[-1] != out:
            residual = conv(out, (1, 1), strides=s, padding="VALID", name="shortcut_conv")(x)
            residual = _batch_norm(self.train, "shortcut_bn")(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """torchvision-style ResNet.

    Stem: conv ``stem_kernel`` x ``stem_kernel`` (stride ``stem_stride``, no bias) -> BN -> ReLU ->
    3x3 max pool stride 2 (``stem_pool``); then ``len(stage_sizes)`` stages of ``block`` with
    ``width * 2**i`` features (stride 2 on the first block of every stage but the first); global
    average pooling (``jnp.mean`` over H, W); a dense head.  ``ResNet18`` and ``ResNet50`` fix
    ``stage_sizes`` and ``block``; a small stem (``stem_kernel=3, stem_stride=1``) suits 8x8 to
    32x32 test images.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: type[nn.Module] = BasicBlock
    num_classes: int = 1000
    width: int = 64
    train: bool = False
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k, s = self.stem_kernel, self.stem_stride
        x = nn.Conv(
            self.width, (k, k), strides=(s, s), padding=_padding(k), use_bias=False, name="stem_conv"
        )(x)
        x = nn.relu(_batch_norm(self.train, "stem_bn")(x))
        if self.stem_pool:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_padding(3))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = self.block(
                    self.width * 2**i, strides=strides, train=self.train, name=f"stage{i + 1}_block{j + 1}"
                )(x)
        x = _global_average_pool(x)
        return nn.Dense(self.num_classes, name="head")(x)


class ResNet18(ResNet):
    """ResNet-18: basic blocks, stages (2, 2, 2, 2); 20 convolutions (3 of them 1x1 shortcuts) + 1 dense."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: type[nn.Module] = BasicBlock


class ResNet50(ResNet):
    """ResNet-50: bottleneck blocks, stages (3, 4, 6, 3); 53 convolutions (4 of them shortcuts) + 1 dense."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: type[nn.Module] = Bottleneck


class _ConvReLU(nn.Module):
    """conv (bias unless followed by BN) -> optional BN -> ReLU."""

    features: int
    kernel: int
    strides: int = 1
    batch_norm: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel
        x = nn.Conv(
            self.features,
            (k, k),
            strides=(self.strides, self.strides),
            padding=_padding(k),
            use_bias=not self.batch_norm,
            name="conv",
        )(x)
        if self.batch_norm:
            x = _batch_norm(self.train, "bn")(x)
        return nn.relu(x)


class InceptionBlock(nn.Module):
    """Inception-v1 block (Szegedy et al. 2015): four parallel branches concatenated on channels.

    ``[1x1 (c1) | 1x1 (c3_reduce) -> 3x3 (c3) | 1x1 (c5_reduce) -> 5x5 (c5) | 3x3 max pool stride 1
    -> 1x1 (pool_proj)]``, every conv followed by ReLU (and BN before it when ``batch_norm``).
    ``factorized=True`` replaces the 5x5 by two 3x3 convolutions (Inception-v2).  Output channels:
    ``c1 + c3 + c5 + pool_proj``.  Relevance flows through the concatenation by the gradient and
    through the max pool to each window's winner.
    """

    c1: int
    c3_reduce: int
    c3: int
    c5_reduce: int
    c5: int
    pool_proj: int
    factorized: bool = False
    batch_norm: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        unit = functools.partial(_ConvReLU, batch_norm=self.batch_norm, train=self.train)
        b1 = unit(self.c1, 1, name="branch1x1")(x)
        b3 = unit(self.c3_reduce, 1, name="branch3x3_reduce")(x)
        b3 = unit(self.c3, 3, name="branch3x3")(b3)
        b5 = unit(self.c5_reduce, 1, name="branch5x5_reduce")(x)
        if self.factorized:
            b5 = unit(self.c5, 3, name="branch5x5_a")(b5)
            b5 = unit(self.c5, 3, name="branch5x5_b")(b5)
        else:
            b5 = unit(self.c5, 5, name="branch5x5")(b5)
        bp = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_padding(3))
        bp = unit(self.pool_proj, 1, name="branch_pool_proj")(bp)
        return jnp.concatenate([b1, b3, b5, bp], axis=-1)


class InceptionNet(nn.Module):
    """A small GoogLeNet-style classifier built from :class:`InceptionBlock`.

    conv 3x3 (64) -> ReLU -> 3x3 max pool stride 2 -> inception 3a (256 out) -> inception 3b (480)
    -> 3x3 max pool stride 2 -> inception 4a (512) -> global average pool -> dense ``num_classes``.
    Channel counts are GoogLeNet's, multiplied by ``width``.  Affine layers: 1 + 3 * 6 + 1 = 20
    (``factorized=True`` adds one 3x3 convolution per block: 23).
    """

    num_classes: int = 10
    width: float = 1.0
    factorized: bool = False
    batch_norm: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = functools.partial(_scaled, width=self.width)
        x = _ConvReLU(w(64), 3, batch_norm=self.batch_norm, train=self.train, name="stem")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_padding(3))
        block = functools.partial(
            InceptionBlock, factorized=self.factorized, batch_norm=self.batch_norm, train=self.train
        )
        x = block(w(64), w(96), w(128), w(16), w(32), w(32), name="inception3a")(x)
        x = block(w(128), w(128), w(192), w(32), w(96), w(64), name="inception3b")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_padding(3))
        x = block(w(192), w(96), w(208), w(16), w(48), w(64), name="inception4a")(x)
        x = _global_average_pool(x)
        return nn.Dense(self.num_classes, name="head")(x)
