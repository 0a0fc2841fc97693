"""Generate the zennit golden files ``golden_zoo_<name>.npz`` for the model zoo (``jaxdtd.models.classic``).

Run from the repository root with a Python that has torch 2.13.0, zennit 1.0.0, jax/flax and jaxdtd::

    .venv-bench/bin/python tests/reference/generate_golden_zoo.py

Every architecture of the zoo at a small size, with random weights:

========================  ==========================================================  ===============
file                      model (``config``)                                          input (NHWC)
========================  ==========================================================  ===============
``golden_zoo_lenet``      ``LeNet(num_classes=10)``                                   (2, 28, 28, 1)
``golden_zoo_vgg16_bn``   ``VGG16(num_classes=10, width=1/16, batch_norm=True)``      (2, 32, 32, 3)
``golden_zoo_resnet18``   ``ResNet18(num_classes=10, width=4)``                       (2, 32, 32, 3)
``golden_zoo_resnet50``   ``ResNet50(num_classes=10, width=4)``                       (1, 32, 32, 3)
``golden_zoo_inception``  ``InceptionNet(num_classes=10, width=1/8, batch_norm=True)``  (2, 32, 32, 3)
========================  ==========================================================  ===============

Flax side: the variables have the structure of ``model.init`` (``jax.eval_shape``, no XLA random kernels)
and are filled from numpy (``default_rng(seed)``, leaves in sorted key order): kernels N(0, 2/fan_in),
biases N(0, 0.1^2) (mixed signs); BatchNorm scale +-U[0.5, 1.5] (about a quarter negative, the first channel
always negative), shift N(0, 0.2^2), running mean N(0, 0.3^2), running var U[0.5, 2], eps 1e-5.  Inputs are
uniform in [0, 1), so the box (0, 1) of ``EpsilonGammaBox`` and ``DeepTaylor`` holds; the target is the
arg-max of the logits.

zennit side: a PyTorch twin (NCHW) of each model, written here, whose module paths equal the Flax ones
("." <-> "/") and whose registration order is the data-flow order: ``SequentialMergeBatchNorm`` merges each
BatchNorm into the convolution registered right before it, and ``SpecialFirstLayerMapComposite`` takes the
first registered affine module (the stem convolution, the one layer that reads the input: jaxdtd's
``first``) as the first layer.  Residual adds are ``zennit.layer.Sum`` over the two branches stacked on a new
last axis (Norm, as jaxdtd's add of two data values), the Inception concatenation is a plain ``torch.cat``
(zennit leaves it to the gradient, as jaxdtd does), the global mean is ``AdaptiveAvgPool2d(1)`` (Norm;
jaxdtd: ``reduce_sum`` with Norm, then a division by a constant), max pooling goes by the gradient, and
LeNet's flatten permutes to NHWC first (Flax's order).  The weights are the stored float32 values, the
computation is float64, and the initial relevance is ``output * onehot(target)``.

Presets (jaxdtd first-layer semantics; all with ``canonizers=[SequentialMergeBatchNorm()]``):

- ``EpsilonPlusFlat``: zennit's ``EpsilonPlusFlat()``;
- ``EpsilonGammaBox``: zennit's ``EpsilonGammaBox(low=0., high=1.)`` (the first layer is a convolution in
  every model here, so zennit's conv-only ``first_map`` matches it);
- ``EpsilonAlpha2Beta1``: zennit's ``EpsilonAlpha2Beta1()``;
- ``DeepTaylor``: jaxdtd's ``DeepTaylor(0., 1.)``, i.e. ``SpecialFirstLayerMapComposite`` with
  ``ZBox(0., 1., zero_params='bias')`` on the first layer and ``ZPlus(zero_params='bias')`` on every other
  convolution and dense layer (zennit has no such preset).

Stored per model: ``config`` (JSON: ``{"model": class name in jaxdtd.models.classic, "kwargs": {...},
"input_shape": [...], "seed": ...}``), ``x`` (float32, NHWC), ``params/...`` and ``batch_stats/...``
(float32, Flax layout, the keys of ``flax.traverse_util.flatten_dict(variables, sep="/")``), ``target``
(int64), ``logits`` (float64, torch), ``presets``, ``relevance/<preset>`` (float64, NHWC) and
``preset_desc/<preset>``.

Checks before writing: every twin parameter is loaded from exactly the stored keys; the Flax forward pass
(float32, jax) reproduces the torch logits; the canonizer restores the BatchNorms after each attribution.
The script prints, per model, the smallest |ReLU input| and top-1 logit margin, and per preset the
conservation ratio ``sum R / f_c(x)`` and zennit's own float32-vs-float64 deviation (relative L2).
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate_golden as gg  # noqa: E402  (installs the torchvision/PIL stand-ins, then imports zennit)
import generate_golden_resnet as ggr  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlusFlat,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.layer import Sum  # noqa: E402
from zennit.rules import ZBox, ZPlus  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent
BN_EPS = 1e-5
LOW, HIGH = 0.0, 1.0
PRESETS = ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "DeepTaylor")
PRESET_DESC = {
    "EpsilonPlusFlat": "zennit.composites.EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])",
    "EpsilonGammaBox": "zennit.composites.EpsilonGammaBox(low=0., high=1., "
    "canonizers=[SequentialMergeBatchNorm()])",
    "EpsilonAlpha2Beta1": "zennit.composites.EpsilonAlpha2Beta1(canonizers=[SequentialMergeBatchNorm()])",
    "DeepTaylor": "SpecialFirstLayerMapComposite(layer_map_base() + [((Linear, Conv2d), "
    "ZPlus(zero_params='bias'))], first_map=[((Linear, Conv2d), ZBox(0., 1., zero_params='bias'))], "
    "canonizers=[SequentialMergeBatchNorm()])",
}


def zennit_composite(preset: str):
    canonizers = [SequentialMergeBatchNorm()]
    if preset == "EpsilonPlusFlat":
        return EpsilonPlusFlat(canonizers=canonizers)
    if preset == "EpsilonGammaBox":
        return EpsilonGammaBox(low=LOW, high=HIGH, canonizers=canonizers)
    if preset == "EpsilonAlpha2Beta1":
        return EpsilonAlpha2Beta1(canonizers=canonizers)
    assert preset == "DeepTaylor", preset
    return SpecialFirstLayerMapComposite(
        layer_map=layer_map_base() + [(gg.AFFINE, ZPlus(zero_params="bias"))],
        first_map=[(gg.AFFINE, ZBox(LOW, HIGH, zero_params="bias"))],
        canonizers=canonizers,
    )


# ---------------------------------------------------------------------------------------------------------
# PyTorch twins of jaxdtd.models.classic (NCHW).  Module paths equal the Flax paths; registration order is
# data-flow order.
# ---------------------------------------------------------------------------------------------------------


def scaled(channels: int, width: float) -> int:
    """jaxdtd.models.classic._scaled, restated."""
    return max(1, int(round(channels * width)))


class Chain(torch.nn.Module):
    """Children applied in registration order."""

    def add(self, name: str, module: torch.nn.Module) -> None:
        self.add_module(name, module)

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


class FlattenNHWC(torch.nn.Module):
    """Flax's ``x.reshape(n, -1)`` of an NHWC map, on an NCHW tensor."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)


class GlobalMean(torch.nn.Module):
    """``jnp.mean(x, axis=(1, 2))``: AdaptiveAvgPool2d(1) (zennit: Norm) and a flatten."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(x).flatten(1)


def lenet_twin(num_classes: int = 10, size: int = 28) -> torch.nn.Module:
    pad = (32 - size) // 2
    m = Chain()
    m.add("conv1", torch.nn.Conv2d(1, 6, 5, padding=pad))
    m.add("relu1", torch.nn.ReLU())
    m.add("pool1", torch.nn.MaxPool2d(2, 2))
    m.add("conv2", torch.nn.Conv2d(6, 16, 5))
    m.add("relu2", torch.nn.ReLU())
    m.add("pool2", torch.nn.MaxPool2d(2, 2))
    m.add("flatten", FlattenNHWC())
    m.add("fc1", torch.nn.Linear(5 * 5 * 16, 120))
    m.add("relu3", torch.nn.ReLU())
    m.add("fc2", torch.nn.Linear(120, 84))
    m.add("relu4", torch.nn.ReLU())
    m.add("fc3", torch.nn.Linear(84, num_classes))
    return m


VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_twin(num_classes: int = 1000, width: float = 1.0, batch_norm: bool = False) -> torch.nn.Module:
    m = Chain()
    cin, index, pool = 3, 0, 0
    for item in VGG16_FEATURES:
        if item == "M":
            m.add(f"pool{pool}", torch.nn.MaxPool2d(2, 2))
            pool += 1
            continue
        cout = scaled(item, width)
        m.add(f"conv{index}", torch.nn.Conv2d(cin, cout, 3, padding=1))
        if batch_norm:
            m.add(f"bn{index}", torch.nn.BatchNorm2d(cout, eps=BN_EPS))
        m.add(f"relu{index}", torch.nn.ReLU())
        cin, index = cout, index + 1
    hidden = scaled(4096, width)
    m.add("gap", GlobalMean())
    m.add("fc1", torch.nn.Linear(cin, hidden))
    m.add("fc1_relu", torch.nn.ReLU())
    m.add("fc2", torch.nn.Linear(hidden, hidden))
    m.add("fc2_relu", torch.nn.ReLU())
    m.add("fc3", torch.nn.Linear(hidden, num_classes))
    return m


class ResidualBlock(torch.nn.Module):
    """BasicBlock (``bottleneck=False``) or Bottleneck: the main path as in classic.py, the shortcut (identity
    or 1x1 conv + BN with the block's stride), ``Sum`` of the two stacked, ReLU."""

    def __init__(self, cin: int, features: int, stride: int, bottleneck: bool):
        super().__init__()
        conv = lambda i, o, k, s=1: torch.nn.Conv2d(i, o, k, s, k // 2, bias=False)  # noqa: E731
        bn = lambda c: torch.nn.BatchNorm2d(c, eps=BN_EPS)  # noqa: E731
        self.bottleneck = bottleneck
        if bottleneck:
            out = 4 * features
            self.conv1, self.bn1, self.relu1 = conv(cin, features, 1), bn(features), torch.nn.ReLU()
            self.conv2, self.bn2, self.relu2 = (
                conv(features, features, 3, stride),
                bn(features),
                torch.nn.ReLU(),
            )
            self.conv3, self.bn3 = conv(features, out, 1), bn(out)
        else:
            out = features
            self.conv1, self.bn1, self.relu1 = conv(cin, features, 3, stride), bn(features), torch.nn.ReLU()
            self.conv2, self.bn2 = conv(features, features, 3), bn(features)
        self.out_channels = out
        self.projection = stride != 1 or cin != out
        if self.projection:
            self.shortcut_conv, self.shortcut_bn = conv(cin, out, 1, stride), bn(out)
        self.add = Sum(dim=-1)
        self.relu_out = torch.nn.ReLU()

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(y)))))
        else:
            y = self.bn2(self.conv2(y))
        residual = self.shortcut_bn(self.shortcut_conv(x)) if self.projection else x
        return self.relu_out(self.add(torch.stack([y, residual], dim=-1)))


def resnet_twin(stage_sizes, bottleneck: bool, num_classes: int = 1000, width: int = 64) -> torch.nn.Module:
    """classic.ResNet with the default stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool)."""
    m = Chain()
    m.add("stem_conv", torch.nn.Conv2d(3, width, 7, 2, 3, bias=False))
    m.add("stem_bn", torch.nn.BatchNorm2d(width, eps=BN_EPS))
    m.add("stem_relu", torch.nn.ReLU())
    m.add("stem_pool", torch.nn.MaxPool2d(3, 2, 1))
    cin = width
    for i, blocks in enumerate(stage_sizes):
        for j in range(blocks):
            block = ResidualBlock(cin, width * 2**i, 2 if i > 0 and j == 0 else 1, bottleneck)
            m.add(f"stage{i + 1}_block{j + 1}", block)
            cin = block.out_channels
    m.add("gap", GlobalMean())
    m.add("head", torch.nn.Linear(cin, num_classes))
    return m


def conv_unit(cin: int, cout: int, kernel: int, batch_norm: bool) -> torch.nn.Module:
    """classic._ConvReLU: conv (bias unless BN) -> BN -> ReLU."""
    m = Chain()
    m.add("conv", torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not batch_norm))
    if batch_norm:
        m.add("bn", torch.nn.BatchNorm2d(cout, eps=BN_EPS))
    m.add("relu", torch.nn.ReLU())
    return m


class InceptionBlockTwin(torch.nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool_proj, factorized: bool, batch_norm: bool):
        super().__init__()
        unit = lambda i, o, k: conv_unit(i, o, k, batch_norm)  # noqa: E731
        self.factorized = factorized
        self.branch1x1 = unit(cin, c1, 1)
        self.branch3x3_reduce = unit(cin, c3r, 1)
        self.branch3x3 = unit(c3r, c3, 3)
        self.branch5x5_reduce = unit(cin, c5r, 1)
        if factorized:
            self.branch5x5_a = unit(c5r, c5, 3)
            self.branch5x5_b = unit(c5, c5, 3)
        else:
            self.branch5x5 = unit(c5r, c5, 5)
        self.pool = torch.nn.MaxPool2d(3, 1, 1)
        self.branch_pool_proj = unit(cin, pool_proj, 1)
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3(self.branch3x3_reduce(x))
        b5 = self.branch5x5_reduce(x)
        b5 = self.branch5x5_b(self.branch5x5_a(b5)) if self.factorized else self.branch5x5(b5)
        bp = self.branch_pool_proj(self.pool(x))
        return torch.cat([b1, b3, b5, bp], dim=1)


def inception_twin(
    num_classes: int = 10, width: float = 1.0, factorized: bool = False, batch_norm: bool = False
) -> torch.nn.Module:
    w = lambda c: scaled(c, width)  # noqa: E731
    block = lambda cin, *c: InceptionBlockTwin(cin, *map(w, c), factorized, batch_norm)  # noqa: E731
    m = Chain()
    m.add("stem", conv_unit(3, w(64), 3, batch_norm))
    m.add("pool1", torch.nn.MaxPool2d(3, 2, 1))
    m.add("inception3a", block(w(64), 64, 96, 128, 16, 32, 32))
    m.add("inception3b", block(m.inception3a.out_channels, 128, 128, 192, 32, 96, 64))
    m.add("pool2", torch.nn.MaxPool2d(3, 2, 1))
    m.add("inception4a", block(m.inception3b.out_channels, 192, 96, 208, 16, 48, 64))
    m.add("gap", GlobalMean())
    m.add("head", torch.nn.Linear(m.inception4a.out_channels, num_classes))
    return m


@dataclass(frozen=True)
class ZooCase:
    name: str
    model: str  # class name in jaxdtd.models.classic
    kwargs: dict = field(hash=False)
    input_shape: tuple[int, ...]
    seed: int

    def twin(self) -> torch.nn.Module:
        kw = self.kwargs
        if self.model == "LeNet":
            return lenet_twin(kw.get("num_classes", 10), self.input_shape[1])
        if self.model == "VGG16":
            return vgg16_twin(**kw)
        if self.model == "ResNet18":
            return resnet_twin((2, 2, 2, 2), False, **kw)
        if self.model == "ResNet50":
            return resnet_twin((3, 4, 6, 3), True, **kw)
        if self.model == "InceptionNet":
            return inception_twin(**kw)
        raise ValueError(self.model)

    def flax_model(self):
        from jaxdtd.models import classic

        return getattr(classic, self.model)(**self.kwargs)


ZOO = (
    ZooCase("lenet", "LeNet", {"num_classes": 10}, (2, 28, 28, 1), 31001),
    ZooCase(
        "vgg16_bn", "VGG16", {"num_classes": 10, "width": 1 / 16, "batch_norm": True}, (2, 32, 32, 3), 31002
    ),
    ZooCase("resnet18", "ResNet18", {"num_classes": 10, "width": 4}, (2, 32, 32, 3), 31003),
    ZooCase("resnet50", "ResNet50", {"num_classes": 10, "width": 4}, (1, 32, 32, 3), 31004),
    ZooCase(
        "inception",
        "InceptionNet",
        {"num_classes": 10, "width": 1 / 8, "batch_norm": True},
        (2, 32, 32, 3),
        31005,
    ),
)

# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def make_data(case: ZooCase) -> dict[str, np.ndarray]:
    """Flax variables of ``model.init``'s structure filled from numpy (see the module docstring), and x."""
    import jax
    from flax import traverse_util

    model = case.flax_model()
    shapes = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(case.input_shape, np.float32)
    )
    flat_shapes = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s.shape, shapes), sep="/")
    rng = np.random.default_rng(case.seed)
    data: dict[str, np.ndarray] = {}
    for key in sorted(flat_shapes):
        shape, leaf = flat_shapes[key], key.rsplit("/", 1)[-1]
        if leaf == "kernel":
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf == "scale":
            sign = np.where(rng.uniform(size=shape) < 0.25, -1.0, 1.0)
            sign[0] = -1.0
            value = sign * rng.uniform(0.5, 1.5, shape)
        elif leaf == "mean":
            value = rng.standard_normal(shape) * 0.3
        elif leaf == "var":
            value = rng.uniform(0.5, 2.0, shape)
        elif leaf == "bias":
            # a BatchNorm shift (its module also holds a scale) or a conv / dense bias
            bn_shift = key[: -len("bias")] + "scale" in flat_shapes
            value = rng.standard_normal(shape) * (0.2 if bn_shift else 0.1)
        else:
            raise KeyError(key)
        data[key] = value.astype(np.float32)
    data["x"] = rng.uniform(0.0, 1.0, case.input_shape).astype(np.float32)
    data["config"] = np.array(
        json.dumps(
            {
                "model": case.model,
                "kwargs": case.kwargs,
                "input_shape": list(case.input_shape),
                "seed": case.seed,
            },
            sort_keys=True,
        )
    )
    return data


def build_twin(case: ZooCase, data: dict[str, np.ndarray], dtype: torch.dtype) -> torch.nn.Module:
    model = case.twin().to(dtype)
    ggr.load_params(model, data, dtype)
    expected = set()
    for name, module in model.named_modules():
        path = name.replace(".", "/")
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            expected |= {f"params/{path}/kernel"} | (
                {f"params/{path}/bias"} if module.bias is not None else set()
            )
        elif isinstance(module, torch.nn.BatchNorm2d):
            expected |= {f"params/{path}/{k}" for k in ("scale", "bias")}
            expected |= {f"batch_stats/{path}/{k}" for k in ("mean", "var")}
    stored = {k for k in data if k.startswith(("params/", "batch_stats/"))}
    assert expected == stored, (case.name, sorted(expected ^ stored))
    return model.eval()


def relu_margin(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The smallest |input| of any ReLU (pre-activation), a float32 sign-flip risk."""
    smallest = [np.inf]

    def hook(module, inputs, output):
        smallest[0] = min(smallest[0], float(inputs[0].abs().min()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return smallest[0]


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def flax_logits(case: ZooCase, data: dict[str, np.ndarray]) -> np.ndarray:
    import jax.numpy as jnp
    from flax import traverse_util

    flat = {
        tuple(k.split("/")): jnp.asarray(v)
        for k, v in data.items()
        if k.startswith(("params/", "batch_stats/"))
    }
    variables = traverse_util.unflatten_dict(flat)
    return np.asarray(case.flax_model().apply(variables, jnp.asarray(data["x"])), np.float64)


def to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def pick_seed(case: ZooCase, tries: int = 20) -> ZooCase:
    """The first seed from ``case.seed`` on whose top-1 logit margin exceeds 1e-3 of the largest |logit| and
    whose arg-max targets differ between the samples (so that a mix-up of targets cannot pass); when no seed
    of ``tries`` gives distinct targets (the random InceptionNet favours one class for every input), the
    first with the margin."""
    candidates = []
    for seed in range(case.seed, case.seed + tries):
        trial = replace(case, seed=seed)
        data = make_data(trial)
        with torch.no_grad():
            logits = build_twin(trial, data, torch.float64)(to_torch(data["x"]).to(torch.float64)).numpy()
        top = np.sort(logits, -1)
        if (top[:, -1] - top[:, -2]).min() > 1e-3 * np.abs(logits).max():
            if len(set(logits.argmax(-1).tolist())) == len(logits):
                return trial
            candidates.append(trial)
    return candidates[0]


def generate(case: ZooCase) -> None:
    case = pick_seed(case)
    data = make_data(case)
    model64, model32 = build_twin(case, data, torch.float64), build_twin(case, data, torch.float32)
    x64, x32 = to_torch(data["x"]).to(torch.float64), to_torch(data["x"]).to(torch.float32)
    with torch.no_grad():
        logits = model64(x64).numpy()
    target = logits.argmax(-1).astype(np.int64)
    target_t = torch.tensor(target)
    data["target"], data["logits"] = target, logits
    jax_logits = flax_logits(case, data)
    np.testing.assert_allclose(jax_logits, logits, rtol=1e-4, atol=1e-5 * np.abs(logits).max())
    top = np.sort(logits, -1)
    n_params = sum(v.size for k, v in data.items() if k.startswith(("params/", "batch_stats/")))
    print(
        f"\n== {case.name}: {case.model}({case.kwargs}), x {case.input_shape}, seed {case.seed}, "
        f"{n_params} parameters\n"
        f"   logits[target] = {np.round(logits[np.arange(len(target)), target], 5)}, target = {target}, "
        f"min top-1 margin {(top[:, -1] - top[:, -2]).min():.3g}, "
        f"min |ReLU input| {relu_margin(model64, x64):.2g}, "
        f"flax vs torch logits max rel. {np.abs(jax_logits - logits).max() / np.abs(logits).max():.1e}"
    )
    print(f"   {'preset':20s} {'sum R / f_c(x) per sample':32s} {'f32 dev':>8s}")
    for preset in PRESETS:
        output, relevance = ggr.attribute(model64, x64, target_t, zennit_composite(preset))
        np.testing.assert_allclose(output, logits, rtol=1e-10, atol=1e-10 * np.abs(logits).max())
        relevance = relevance.transpose(0, 2, 3, 1)
        _, relevance32 = ggr.attribute(model32, x32, target_t, zennit_composite(preset))
        f32_dev = relative_l2(relevance32.transpose(0, 2, 3, 1).astype(np.float64), relevance)
        ratio = relevance.reshape(len(target), -1).sum(-1) / logits[np.arange(len(target)), target]
        assert np.all(np.isfinite(relevance)) and np.abs(relevance).max() > 0, (case.name, preset)
        print(f"   {preset:20s} {np.array2string(ratio, precision=5, floatmode='fixed'):32s} {f32_dev:8.1e}")
        data[f"relevance/{preset}"] = relevance.astype(np.float64)
        data[f"preset_desc/{preset}"] = np.array(PRESET_DESC[preset])
    data["presets"] = np.array(PRESETS)
    path = OUT_DIR / f"golden_zoo_{case.name}.npz"
    gg.save_npz(path, data)
    with np.load(path, allow_pickle=False) as check:
        assert set(check.files) == set(data), set(check.files) ^ set(data)
        for key, value in data.items():
            np.testing.assert_array_equal(check[key], value)
    size = path.stat().st_size
    print(f"   wrote {path.name} ({size / 1024:.1f} KiB, {len(data)} arrays)")
    assert size < 1.5e6, size


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "zennit", "jax", "flax"))
    print(versions)
    names = sys.argv[1:]
    for case in ZOO:
        if not names or case.name in names:
            generate(case)


if __name__ == "__main__":
    main()
