"""Generate the zennit golden files ``golden_mlp.npz`` and ``golden_cnn.npz`` for the jaxdtd tests.

Run from the repository root::

    .venv-ref/bin/python tests/reference/generate_golden.py

Requirements (CPU is enough; jax is *not* needed)::

    pip install torch==2.13.0 numpy
    pip install --no-deps --ignore-requires-python zennit==1.0.0 click

zennit imports ``torchvision`` (``zennit.torchvision``, ``zennit.types``) and ``PIL`` (``zennit.image``) at
import time although none of the code used here needs them; when they are missing this script installs
minimal stand-ins for exactly the names zennit imports (``torchvision.ops.FrozenBatchNorm2d``,
``torchvision.models.resnet.Bottleneck``/``BasicBlock``, ``PIL.Image``) before ``import zennit``.

What it does: builds PyTorch twins of the Flax models ``MLP`` and ``CNN`` in ``tests/models.py`` with fixed
random weights (numpy ``default_rng``, fixed seeds), computes zennit's attribution with respect to the input
for every case in ``CASES`` with ``attr_output = output * onehot(target)`` in float64, and writes, per model:

- ``x``: the input (float32; NHWC for the CNN), inside [-4, 4];
- ``params/<Module>/kernel``, ``params/<Module>/bias``: float32, Flax layout (HWIO / (in, out));
- ``target``: int64 (N,), the arg-max of the logits; ``logits``: float64, the torch forward output;
- ``zbox_low``, ``zbox_high``: float32, one sample's shape, the bounds of ``zbox_array_first_epsilon``;
- ``cases``: unicode array of the case names;
- ``relevance/<case>``: float64, zennit's input relevance in the Flax layout (NHWC for the CNN);
- ``case_desc/<case>``: unicode scalar, the zennit composite used.

Before writing, every result is checked against an independent numpy implementation of the formulas in
``docs/rules.md`` (convolutions written out as explicit matrices in NHWC order), and
zennit's own preset classes are compared with the hand-built composites.  The script prints the
conservation sums and the float32-vs-float64 deviation of zennit per case.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import sys
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


def _install_import_stubs() -> None:
    """Stand-ins for the optional packages zennit imports at import time (only when they are absent)."""
    if importlib.util.find_spec("torchvision") is None:
        torchvision = types.ModuleType("torchvision")
        torchvision.__path__ = []
        ops = types.ModuleType("torchvision.ops")
        models = types.ModuleType("torchvision.models")
        models.__path__ = []
        resnet = types.ModuleType("torchvision.models.resnet")

        # zennit.types puts FrozenBatchNorm2d in its BatchNorm type; zennit.torchvision matches ResNet blocks.
        # Fresh classes that no module of ours is an instance of.
        class FrozenBatchNorm2d(torch.nn.Module):
            """Stand-in; never instantiated."""

        class Bottleneck(torch.nn.Module):
            """Stand-in; never instantiated."""

        class BasicBlock(torch.nn.Module):
            """Stand-in; never instantiated."""

        ops.FrozenBatchNorm2d = FrozenBatchNorm2d
        resnet.Bottleneck = Bottleneck
        resnet.BasicBlock = BasicBlock
        torchvision.ops = ops
        torchvision.models = models
        models.resnet = resnet
        sys.modules.update(
            {
                "torchvision": torchvision,
                "torchvision.ops": ops,
                "torchvision.models": models,
                "torchvision.models.resnet": resnet,
            }
        )
    if importlib.util.find_spec("PIL") is None:
        pil = types.ModuleType("PIL")
        pil.__path__ = []
        # zennit.image does `from PIL import Image`; only its imgify uses it.
        image = types.ModuleType("PIL.Image")
        pil.Image = image
        sys.modules.update({"PIL": pil, "PIL.Image": image})


_install_import_stubs()

from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent
BOX_LOW, BOX_HIGH = -4.0, 4.0
AFFINE = (torch.nn.Linear, torch.nn.Conv2d)
BOUND_NAMES = ("zbox_low", "zbox_high")  # stand for the stored array bounds in a Rule's kwargs

# ---------------------------------------------------------------------------------------------------------
# PyTorch twins of tests/models.py.  Module attribute names equal the Flax module names, and registration
# order equals data-flow order, so zennit's "first layer" (first registered match) is Dense_0 / Conv_0.
# ---------------------------------------------------------------------------------------------------------


class MLPTwin(torch.nn.Module):
    """Dense_0 6->8, ReLU, Dense_1 8->8, ReLU, Dense_2 8->5."""

    def __init__(self):
        super().__init__()
        self.Dense_0 = torch.nn.Linear(6, 8)
        self.relu_0 = torch.nn.ReLU()
        self.Dense_1 = torch.nn.Linear(8, 8)
        self.relu_1 = torch.nn.ReLU()
        self.Dense_2 = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu_0(self.Dense_0(x))
        x = self.relu_1(self.Dense_1(x))
        return self.Dense_2(x)


class CNNTwin(torch.nn.Module):
    """NCHW input; conv/ReLU/maxpool/conv/ReLU/avgpool, then flatten in NHWC order, Dense/ReLU/Dense."""

    def __init__(self):
        super().__init__()
        self.Conv_0 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu_0 = torch.nn.ReLU()
        self.pool_0 = torch.nn.MaxPool2d(2)
        self.Conv_1 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.relu_1 = torch.nn.ReLU()
        self.pool_1 = torch.nn.AvgPool2d(2)
        self.Dense_0 = torch.nn.Linear(24, 10)
        self.relu_2 = torch.nn.ReLU()
        self.Dense_1 = torch.nn.Linear(10, 5)

    def forward(self, x):
        x = self.pool_0(self.relu_0(self.Conv_0(x)))
        x = self.pool_1(self.relu_1(self.Conv_1(x)))
        x = x.permute(0, 2, 3, 1).flatten(1)  # Flax flattens (H, W, C); structural, no zennit rule
        x = self.relu_2(self.Dense_0(x))
        return self.Dense_1(x)


def load_flax_params(model: torch.nn.Module, params: dict[str, np.ndarray], dtype: torch.dtype) -> None:
    """Copy Flax-layout parameters into the twin: Linear weight = kernel.T, Conv2d weight = HWIO -> OIHW."""
    for name, module in model.named_modules():
        if not isinstance(module, AFFINE):
            continue
        kernel = params[f"params/{name}/kernel"]
        weight = kernel.T if isinstance(module, torch.nn.Linear) else kernel.transpose(3, 2, 0, 1)
        module.weight = torch.nn.Parameter(torch.tensor(weight, dtype=dtype))
        module.bias = torch.nn.Parameter(torch.tensor(params[f"params/{name}/bias"], dtype=dtype))


# ---------------------------------------------------------------------------------------------------------
# Data: weights ~ N(0, 2 / fan_in) (He), biases ~ N(0, 0.1^2), inputs standard normal clipped to the box.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    name: str
    twin: type
    input_shape: tuple[int, ...]  # Flax layout, batch first
    layers: tuple[tuple[str, tuple[int, ...]], ...]  # (module name, kernel shape in Flax layout)
    seed: int
    to_torch: Callable[[np.ndarray], np.ndarray] = field(default=lambda a: a)  # Flax layout -> torch layout
    from_torch: Callable[[np.ndarray], np.ndarray] = field(default=lambda a: a)


MLP = ModelSpec(
    name="mlp",
    twin=MLPTwin,
    input_shape=(4, 6),
    layers=(("Dense_0", (6, 8)), ("Dense_1", (8, 8)), ("Dense_2", (8, 5))),
    seed=20240,
)
CNN = ModelSpec(
    name="cnn",
    twin=CNNTwin,
    input_shape=(3, 8, 8, 3),
    layers=(
        ("Conv_0", (3, 3, 3, 4)),
        ("Conv_1", (3, 3, 4, 6)),
        ("Dense_0", (24, 10)),
        ("Dense_1", (10, 5)),
    ),
    seed=20241,
    to_torch=lambda a: a.transpose(0, 3, 1, 2),
    from_torch=lambda a: a.transpose(0, 2, 3, 1),
)


def make_data(spec: ModelSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    data: dict[str, np.ndarray] = {}
    for name, shape in spec.layers:
        fan_in = int(np.prod(shape[:-1]))
        kernel = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        data[f"params/{name}/kernel"] = kernel.astype(np.float32)
        data[f"params/{name}/bias"] = (rng.standard_normal(shape[-1]) * 0.1).astype(np.float32)
    data["x"] = np.clip(rng.standard_normal(spec.input_shape), BOX_LOW, BOX_HIGH).astype(np.float32)
    sample_shape = spec.input_shape[1:]
    data["zbox_low"] = (BOX_LOW - 0.5 * rng.uniform(size=sample_shape)).astype(np.float32)
    data["zbox_high"] = (BOX_HIGH + 0.5 * rng.uniform(size=sample_shape)).astype(np.float32)
    return data


# ---------------------------------------------------------------------------------------------------------
# Cases: a rule for the first affine layer (or None), one for Conv2d and one for Linear.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A zennit rule class with keyword arguments; the strings 'zbox_low'/'zbox_high' stand for the arrays."""

    cls: type
    kwargs: tuple = ()

    def make(self, bounds: dict[str, torch.Tensor]):
        return self.cls(**{k: bounds.get(v, v) if isinstance(v, str) else v for k, v in self.kwargs})

    def __str__(self):
        args = ", ".join(f"{k}={v}" if v in BOUND_NAMES else f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.cls.__name__}({args})"


def rule(cls, **kwargs) -> Rule:
    return Rule(cls, tuple(kwargs.items()))


@dataclass(frozen=True)
class Case:
    name: str
    conv: Rule
    dense: Rule
    first: Rule | None = None

    def composite(self, bounds: dict[str, torch.Tensor]):
        if self.conv == self.dense:
            affine_map = [(AFFINE, self.conv.make(bounds))]
        else:
            affine_map = [
                (torch.nn.Conv2d, self.conv.make(bounds)),
                (torch.nn.Linear, self.dense.make(bounds)),
            ]
        layer_map = layer_map_base() + affine_map
        if self.first is None:
            return LayerMapComposite(layer_map=layer_map)
        first_map = [(AFFINE, self.first.make(bounds))]
        return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map)

    def describe(self, first_name: str) -> str:
        if self.conv == self.dense:
            affine = f"((Linear, Conv2d), {self.conv})"
        else:
            affine = f"(Conv2d, {self.conv}), (Linear, {self.dense})"
        text = f"layer_map=layer_map_base() + [{affine}]"
        if self.first is None:
            return f"LayerMapComposite({text})"
        return (
            f"SpecialFirstLayerMapComposite({text}, first_map=[((Linear, Conv2d), {self.first})])"
            f"; first layer = {first_name}"
        )


EPS = rule(Epsilon, epsilon=1e-6)
BOX = rule(ZBox, low=BOX_LOW, high=BOX_HIGH)


def single(name: str, r: Rule) -> Case:
    return Case(name, conv=r, dense=r)


CASES = (
    single("epsilon", EPS),
    single("epsilon_0.25", rule(Epsilon, epsilon=0.25)),
    single("epsilon_nobias", rule(Epsilon, epsilon=1e-6, zero_params="bias")),
    single("zplus", rule(ZPlus)),
    single("zplus_nobias", rule(ZPlus, zero_params="bias")),
    single("alphabeta_2_1", rule(AlphaBeta, alpha=2.0, beta=1.0)),
    single("alphabeta_1_0", rule(AlphaBeta, alpha=1.0, beta=0.0)),
    single("gamma_0.25", rule(Gamma, gamma=0.25)),
    single("gamma_1", rule(Gamma, gamma=1.0)),
    single("gamma_nobias", rule(Gamma, gamma=0.25, zero_params="bias")),
    single("wsquare", rule(WSquare)),
    single("wsquare_nobias", rule(WSquare, zero_params="bias")),
    single("flat", rule(Flat)),
    Case("zbox_first_epsilon", conv=EPS, dense=EPS, first=BOX),
    Case("zbox_array_first_epsilon", conv=EPS, dense=EPS, first=rule(ZBox, low="zbox_low", high="zbox_high")),
    Case("EpsilonPlus", conv=rule(ZPlus), dense=EPS),
    Case("EpsilonPlusFlat", conv=rule(ZPlus), dense=EPS, first=rule(Flat)),
    Case("EpsilonAlpha2Beta1", conv=rule(AlphaBeta, alpha=2.0, beta=1.0), dense=EPS),
    Case("EpsilonAlpha2Beta1Flat", conv=rule(AlphaBeta, alpha=2.0, beta=1.0), dense=EPS, first=rule(Flat)),
    Case("EpsilonGammaBox", conv=rule(Gamma, gamma=0.25), dense=EPS, first=BOX),
    Case(
        "DeepTaylor",
        conv=rule(ZPlus, zero_params="bias"),
        dense=rule(ZPlus, zero_params="bias"),
        first=rule(WSquare, zero_params="bias"),
    ),
    Case(
        "DeepTaylorBox",
        conv=rule(ZPlus, zero_params="bias"),
        dense=rule(ZPlus, zero_params="bias"),
        first=rule(ZBox, low=BOX_LOW, high=BOX_HIGH, zero_params="bias"),
    ),
)

# Cases whose input relevance must sum to f_c(x) per sample (up to the 1e-6 stabilizers): bias-free rules
# on a plain ReLU net.  Flat and WSquare on *every* layer put relevance on neurons whose ReLU output is 0
# (the Pass rule forwards it), which the CNN's average pool then drops wherever all four inputs are 0
# (Norm: x_i * R_j / stab(0) = 0), so they are exactly conservative only on the MLP.
CONSERVATIVE = {"epsilon_nobias", "zplus_nobias", "gamma_nobias", "DeepTaylor", "DeepTaylorBox"}
CONSERVATIVE_MLP_ONLY = {"wsquare_nobias", "flat"}

# zennit's own preset classes, compared with the hand-built composite of the same name.  They agree on the
# CNN.  On the MLP zennit's EpsilonGammaBox differs by design: its first_map only matches a Convolution, so
# Dense_0 gets Epsilon and the result equals the "epsilon" case (jaxdtd puts ZBox on the first affine layer).
ZENNIT_PRESETS = {
    "EpsilonPlus": lambda: EpsilonPlus(),
    "EpsilonPlusFlat": lambda: EpsilonPlusFlat(),
    "EpsilonAlpha2Beta1": lambda: EpsilonAlpha2Beta1(),
    "EpsilonAlpha2Beta1Flat": lambda: EpsilonAlpha2Beta1Flat(),
    "EpsilonGammaBox": lambda: EpsilonGammaBox(low=BOX_LOW, high=BOX_HIGH),
}


# ---------------------------------------------------------------------------------------------------------
# zennit attribution
# ---------------------------------------------------------------------------------------------------------


def build_twin(spec: ModelSpec, data: dict[str, np.ndarray], dtype: torch.dtype) -> torch.nn.Module:
    model = spec.twin().to(dtype)
    load_flax_params(model, data, dtype)
    model.eval()
    first_affine = next(name for name, m in model.named_modules() if isinstance(m, AFFINE))
    assert first_affine == spec.layers[0][0], first_affine
    return model


def torch_bounds(spec: ModelSpec, data: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-sample bounds in torch layout *with a leading batch axis of 1*: zennit's ``expand`` aligns
    shapes from the left (it appends trailing singleton axes), so a bare (C, H, W) or (F,) array is rejected
    (or, when its first size happens to equal the batch size, silently taken as a per-batch bound)."""
    return {key: torch.tensor(spec.to_torch(data[key][None]).copy(), dtype=dtype) for key in BOUND_NAMES}


def onehot(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, output.shape[1]).to(output)


def attribute(model, x_torch: torch.Tensor, target: torch.Tensor, composite) -> tuple[np.ndarray, np.ndarray]:
    """zennit's Gradient attributor under ``composite`` with initial relevance ``output * onehot(target)``."""
    x_torch = x_torch.detach().clone().requires_grad_(True)
    with Gradient(model=model, composite=composite) as attributor:
        output, relevance = attributor(x_torch, attr_output=lambda out: out * onehot(target, out))
    assert not composite.handles, "composite hooks were not removed"
    return output.detach().numpy(), relevance.detach().numpy()


# ---------------------------------------------------------------------------------------------------------
# Independent numpy reference of rules.md (float64).  Every layer is written as an explicit matrix acting on
# one sample flattened in the Flax (NHWC) order, so a convolution's padding is simply absent taps.
# ---------------------------------------------------------------------------------------------------------


def conv_same_matrix(kernel: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H*W*Ci, H*W*Co) matrix of a stride-1 SAME cross-correlation with an HWIO kernel."""
    kh, kw, ci, co = kernel.shape
    matrix = np.zeros((height, width, ci, height, width, co))
    for h in range(height):
        for w in range(width):
            for a in range(kh):
                for b in range(kw):
                    hi, wi = h + a - kh // 2, w + b - kw // 2
                    if 0 <= hi < height and 0 <= wi < width:
                        matrix[hi, wi, :, h, w, :] = kernel[a, b]
    return matrix.reshape(height * width * ci, height * width * co)


def pool_windows(height: int, width: int, channels: int) -> np.ndarray:
    """(Ho*Wo*C, 4) flat input indices of the 2x2 stride-2 windows, output in NHWC order."""
    idx = np.arange(height * width * channels).reshape(height, width, channels)
    win = idx.reshape(height // 2, 2, width // 2, 2, channels).transpose(0, 2, 4, 1, 3)
    return win.reshape(-1, 4)


def reference_ops(spec: ModelSpec, data: dict[str, np.ndarray]) -> list[tuple]:
    p = {k: v.astype(np.float64) for k, v in data.items() if k.startswith("params/")}

    def affine(name, matrix, bias_per_out):
        connect = np.ones_like(matrix) if name.startswith("Dense") else None
        return ("affine", name, matrix, bias_per_out, connect)

    if spec is MLP:
        ops = []
        for i, (name, _) in enumerate(spec.layers):
            ops.append(affine(name, p[f"params/{name}/kernel"], p[f"params/{name}/bias"]))
            if i < len(spec.layers) - 1:
                ops.append(("relu",))
        return ops

    def conv(name, size):
        kernel, bias = p[f"params/{name}/kernel"], p[f"params/{name}/bias"]
        matrix = conv_same_matrix(kernel, size, size)
        connect = conv_same_matrix(np.ones_like(kernel), size, size)
        return ("affine", name, matrix, np.tile(bias, size * size), connect)

    pool_avg = np.zeros((4 * 4 * 6, 2 * 2 * 6))
    for j, window in enumerate(pool_windows(4, 4, 6)):
        pool_avg[window, j] = 0.25
    return [
        conv("Conv_0", 8),
        ("relu",),
        ("maxpool", pool_windows(8, 8, 4)),
        conv("Conv_1", 4),
        ("relu",),
        ("norm", pool_avg),
        affine("Dense_0", p["params/Dense_0/kernel"], p["params/Dense_0/bias"]),
        ("relu",),
        affine("Dense_1", p["params/Dense_1/kernel"], p["params/Dense_1/bias"]),
    ]


def stab(z: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def affine_relevance(r: Rule, x, matrix, bias, connect, relevance, bounds):
    """R_in of one affine layer, straight from the table in rules.md."""
    kw = dict(r.kwargs)
    z = x @ matrix + bias  # Gamma's masks use the layer's own output, bias included even with zero_params
    if kw.get("zero_params") == "bias":
        bias = np.zeros_like(bias)
    pos, neg = (lambda a: np.maximum(a, 0.0)), (lambda a: np.minimum(a, 0.0))
    xp, xn, wp, wn = pos(x), neg(x), pos(matrix), neg(matrix)
    name = r.cls.__name__
    if name == "Epsilon":
        s = relevance / stab(x @ matrix + bias, kw.get("epsilon", 1e-6))
        return x * (s @ matrix.T)
    if name in ("ZPlus", "AlphaBeta"):
        alpha, beta = (1.0, 0.0) if name == "ZPlus" else (kw["alpha"], kw["beta"])
        sp = relevance / stab(xp @ wp + xn @ wn + pos(bias))
        sn = relevance / stab(xp @ wn + xn @ wp + neg(bias))
        return alpha * (xp * (sp @ wp.T) + xn * (sp @ wn.T)) - beta * (xp * (sn @ wn.T) + xn * (sn @ wp.T))
    if name == "Gamma":
        g = kw["gamma"]
        up, un = matrix + g * wp, matrix + g * wn
        su = relevance * (z > 0) / stab(xp @ up + xn @ un + bias + g * pos(bias))
        sd = relevance * (z < 0) / stab(xp @ un + xn @ up + bias + g * neg(bias))
        return xp * (su @ up.T) + xn * (su @ un.T) + xp * (sd @ un.T) + xn * (sd @ up.T)
    if name == "ZBox":
        low = np.broadcast_to(bounds.get(kw["low"], kw["low"]), x.shape[1:]).reshape(1, -1)
        high = np.broadcast_to(bounds.get(kw["high"], kw["high"]), x.shape[1:]).reshape(1, -1)
        s = relevance / stab(x @ matrix - low @ wp - high @ wn)
        return x * (s @ matrix.T) - low * (s @ wp.T) - high * (s @ wn.T)
    if name == "WSquare":
        s = relevance / stab((matrix**2).sum(0) + bias**2)
        return s @ (matrix**2).T
    if name == "Flat":
        s = relevance / stab(connect.sum(0))
        return s @ connect.T
    raise ValueError(name)


def reference_relevance(spec, data, case: Case, target) -> tuple[np.ndarray, np.ndarray]:
    ops = reference_ops(spec, data)
    n = data["x"].shape[0]
    bounds = {k: data[k].astype(np.float64).reshape(-1) for k in BOUND_NAMES}
    h = data["x"].astype(np.float64).reshape(n, -1)
    inputs = []
    for op in ops:  # forward
        inputs.append(h)
        if op[0] == "affine":
            h = h @ op[2] + op[3]
        elif op[0] == "relu":
            h = np.maximum(h, 0.0)
        elif op[0] == "maxpool":
            h = h[:, op[1]].max(-1)
        elif op[0] == "norm":
            h = h @ op[1]
    logits = h
    relevance = logits * np.eye(logits.shape[1])[target]
    first_seen = False
    for op, x in zip(reversed(ops), reversed(inputs), strict=True):  # backward
        if op[0] == "affine":
            is_first = op[1] == spec.layers[0][0]
            kind = case.conv if op[1].startswith("Conv") else case.dense
            r = case.first if (is_first and case.first is not None) else kind
            first_seen |= is_first
            relevance = affine_relevance(r, x, op[2], op[3], op[4], relevance, bounds)
        elif op[0] == "relu":
            pass  # Pass rule
        elif op[0] == "maxpool":  # gradient: all relevance to the window's arg-max
            new = np.zeros_like(x)
            winner = op[1][np.arange(op[1].shape[0]), x[:, op[1]].argmax(-1)]
            np.add.at(new, (np.arange(n)[:, None], winner), relevance)
            relevance = new
        elif op[0] == "norm":
            relevance = x * ((relevance / stab(x @ op[1])) @ op[1].T)
    assert first_seen
    return logits, relevance.reshape(data["x"].shape)


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def forward_margins(spec, data) -> dict[str, float]:
    """Distances from the decision boundaries a float32 re-implementation could flip."""
    ops = reference_ops(spec, data)
    h = data["x"].astype(np.float64).reshape(data["x"].shape[0], -1)
    pre, ties = [], [np.inf]
    for op in ops:
        if op[0] == "affine":
            h = h @ op[2] + op[3]
            pre.append(np.abs(h).min())
        elif op[0] == "relu":
            h = np.maximum(h, 0.0)
        elif op[0] == "maxpool":
            windows = np.sort(h[:, op[1]], -1)
            live = windows[..., -1] > 0
            ties.append((windows[..., -1] - windows[..., -2])[live].min())
            h = windows[..., -1]
        elif op[0] == "norm":
            h = h @ op[1]
    top = np.sort(h, -1)
    return {
        "min |pre-activation|": min(pre),
        "min max-pool gap": min(ties),
        "min logit margin": (top[:, -1] - top[:, -2]).min(),
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed member timestamps, so that regenerating gives identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def generate(spec: ModelSpec) -> None:
    data = make_data(spec)
    model64 = build_twin(spec, data, torch.float64)
    model32 = build_twin(spec, data, torch.float32)
    x_np = spec.to_torch(data["x"]).copy()
    x64, x32 = torch.tensor(x_np, dtype=torch.float64), torch.tensor(x_np, dtype=torch.float32)
    bounds64, bounds32 = torch_bounds(spec, data, torch.float64), torch_bounds(spec, data, torch.float32)

    with torch.no_grad():
        logits = model64(x64).numpy()
    target = logits.argmax(-1).astype(np.int64)
    target_t = torch.tensor(target)
    data["target"], data["logits"] = target, logits

    ref_logits, _ = reference_relevance(spec, data, CASES[0], target)
    np.testing.assert_allclose(ref_logits, logits, rtol=1e-12, atol=1e-12)
    margins = forward_margins(spec, data)
    print(
        f"\n== {spec.name}: logits[target] = {np.round(logits[np.arange(len(target)), target], 6)}, "
        f"target = {target}"
    )
    print("   " + ", ".join(f"{k} = {v:.3g}" for k, v in margins.items()))
    print(f"   {'case':26s} {'sum R / f_c(x) per sample':44s} {'vs numpy':>9s} {'f32 dev':>9s}")

    results = {}
    for case in CASES:
        output, relevance = attribute(model64, x64, target_t, case.composite(bounds64))
        np.testing.assert_array_equal(output, logits)
        relevance = spec.from_torch(relevance)
        _, relevance32 = attribute(model32, x32, target_t, case.composite(bounds32))
        relevance32 = spec.from_torch(relevance32)
        scale = np.abs(relevance).max()
        _, reference = reference_relevance(spec, data, case, target)
        numpy_dev = np.abs(reference - relevance).max() / scale
        assert numpy_dev < 1e-9, (case.name, numpy_dev)
        f32_dev = np.abs(relevance32 - relevance).max() / scale
        ratio = relevance.reshape(len(target), -1).sum(-1) / logits[np.arange(len(target)), target]
        print(
            f"   {case.name:26s} {np.array2string(ratio, precision=6, floatmode='fixed'):44s} "
            f"{numpy_dev:9.1e} {f32_dev:9.1e}"
        )
        if case.name in CONSERVATIVE or (spec is MLP and case.name in CONSERVATIVE_MLP_ONLY):
            assert np.abs(ratio - 1).max() < 1e-4, (case.name, ratio)
        results[case.name] = relevance
        data[f"relevance/{case.name}"] = relevance.astype(np.float64)
        data[f"case_desc/{case.name}"] = np.array(case.describe(spec.layers[0][0]))

    for name, make in ZENNIT_PRESETS.items():
        _, relevance = attribute(model64, x64, target_t, make())
        relevance = spec.from_torch(relevance)
        dev = np.abs(relevance - results[name]).max() / np.abs(results[name]).max()
        print(
            f"   zennit.composites.{name}() vs hand-built: max rel. dev {dev:.1e}"
            f" ({'same' if dev < 1e-12 else 'DIFFERENT'})"
        )
        if spec is MLP and name == "EpsilonGammaBox":
            np.testing.assert_array_equal(relevance, results["epsilon"])
        else:
            assert dev < 1e-12, (spec.name, name, dev)

    data["cases"] = np.array([case.name for case in CASES])
    path = OUT_DIR / f"golden_{spec.name}.npz"
    save_npz(path, data)
    with np.load(path, allow_pickle=False) as check:
        assert set(check.files) == set(data), set(check.files) ^ set(data)
        for key, value in data.items():
            np.testing.assert_array_equal(check[key], value)
    print(f"   wrote {path} ({path.stat().st_size / 1024:.1f} KiB, {len(data)} arrays)")


def main() -> None:
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, zennit {importlib.metadata.version('zennit')}")
    for spec in (MLP, CNN):
        generate(spec)


if __name__ == "__main__":
    main()
