"""Generate the zennit golden files ``golden_bn_cnn.npz`` and ``golden_resnet.npz`` for the jaxdtd tests.

Run from the repository root (same requirements as ``generate_golden.py``, whose helpers it imports)::

    .venv-ref/bin/python tests/reference/generate_golden_resnet.py

Two models with inference-mode BatchNorm, in the Flax layout of ``tests/test_models.py``:

- ``bn_cnn``: Conv_0 3x3 (4) -> BatchNorm_0 -> ReLU -> maxpool 2 -> Conv_1 3x3 (6) -> BatchNorm_1 -> ReLU
  -> avgpool 2 -> flatten (H, W, C) -> Dense_0 (10) -> ReLU -> Dense_1 (5); input (3, 8, 8, 3).  The
  convolutions have biases, so the folding must merge them too: ``b' = (b - mean) * s + shift``.
- ``resnet``: ``jaxdtd.models.classic.ResNet(stage_sizes=(1, 1), width=4, num_classes=5, stem_kernel=3,
  stem_stride=1)``: stem conv 3x3 + BN + ReLU + 3x3/2 max pool, a basic block with identity shortcut, a
  basic block with stride 2 and a 1x1 conv + BN projection shortcut, global average pool, dense head;
  input (2, 8, 8, 3).

zennit side: ``SequentialMergeBatchNorm`` merges every BatchNorm into the convolution registered right
before it (so ZPlus, Gamma, WSquare, ... act on the *folded* kernel), the residual sum is a
``zennit.layer.Sum`` over the two stacked branches (rule Norm, as jaxdtd's add of two data values), and
pooling is ``AvgPool2d`` / ``AdaptiveAvgPool2d`` (Norm; jaxdtd: ``reduce_window_sum`` / ``reduce_sum``
with Norm, then a division by a constant with Pass, which is the same).

Stored, per model (float32 unless noted):

- ``x``; ``params/<path>/kernel`` (HWIO / (in, out)), ``params/<path>/bias`` (convolutions of ``bn_cnn``
  and dense layers only), ``params/<bn path>/scale|bias`` and ``batch_stats/<bn path>/mean|var``;
- ``target`` (int64), ``logits`` (float64), ``cases``, ``relevance/<case>`` (float64, NHWC),
  ``case_desc/<case>``;
- ``resnet`` only: ``logits_biasfree`` and ``relevance_biasfree/DeepTaylor`` (float64), the DeepTaylor
  relevance of the same network with every BatchNorm mean and shift and the head bias set to 0, so that
  the forward function is bias-free and DeepTaylor's non-conservation at the residual sums can be measured.

BatchNorm statistics and affine parameters are non-trivial: mean ~ N(0, 0.3^2), var ~ U[0.5, 2], scale
~ +-U[0.5, 1.5] with mixed signs (the first channel always negative), shift ~ N(0, 0.2^2), eps 1e-5.

Seeds: 20246 (``bn_cnn``) and 20262 (``resnet``), picked from the first few for arg-max targets that differ
between samples and, for the ResNet, a bias-free DeepTaylor relevance that is measurably not conservative
(sample 0 gains 5%: a branch value below 0 without positive contributions at a residual sum).

Checks before writing: zennit on the BN models equals zennit on plain twins whose BatchNorm was folded
by hand, and both equal an independent numpy implementation of rules.md (explicit NHWC matrices, the
``bn_cnn`` through ``generate_golden.reference_relevance``); the numpy forward pass reproduces torch's
logits; DeepTaylor on ``bn_cnn`` is conservative; zennit's own preset classes (with the canonizer) equal
the hand-built composites.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate_golden as gg  # noqa: E402  (installs the torchvision/PIL stand-ins, then imports zennit)
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
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
from zennit.layer import Sum  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent
BN_EPS = 1e-5
RESNET_WIDTH = 4
CASE_NAMES = (
    "epsilon",
    "zplus",
    "gamma_0.25",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
    "DeepTaylor",
    "DeepTaylorBox",
)
CASES = tuple(next(c for c in gg.CASES if c.name == name) for name in CASE_NAMES)
ZENNIT_PRESETS = {
    "EpsilonPlus": EpsilonPlus,
    "EpsilonPlusFlat": EpsilonPlusFlat,
    "EpsilonAlpha2Beta1": EpsilonAlpha2Beta1,
    "EpsilonAlpha2Beta1Flat": EpsilonAlpha2Beta1Flat,
    "EpsilonGammaBox": lambda canonizers: EpsilonGammaBox(
        low=gg.BOX_LOW, high=gg.BOX_HIGH, canonizers=canonizers
    ),
}

# ---------------------------------------------------------------------------------------------------------
# PyTorch twins.  Attribute names equal the Flax module names ("." <-> "/"), and registration order equals
# data-flow order: SequentialMergeBatchNorm pairs each BatchNorm with the leaf registered right before it,
# and SpecialFirstLayerMapComposite takes the first registered affine module as the first layer.
# ---------------------------------------------------------------------------------------------------------


class BNCNNTwin(torch.nn.Module):
    """NCHW; conv/BN/ReLU/maxpool/conv/BN/ReLU/avgpool, flatten in NHWC order, Dense/ReLU/Dense."""

    def __init__(self):
        super().__init__()
        self.Conv_0 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.BatchNorm_0 = torch.nn.BatchNorm2d(4, eps=BN_EPS)
        self.relu_0 = torch.nn.ReLU()
        self.pool_0 = torch.nn.MaxPool2d(2)
        self.Conv_1 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.BatchNorm_1 = torch.nn.BatchNorm2d(6, eps=BN_EPS)
        self.relu_1 = torch.nn.ReLU()
        self.pool_1 = torch.nn.AvgPool2d(2)
        self.Dense_0 = torch.nn.Linear(24, 10)
        self.relu_2 = torch.nn.ReLU()
        self.Dense_1 = torch.nn.Linear(10, 5)

    def forward(self, x):
        x = self.pool_0(self.relu_0(self.BatchNorm_0(self.Conv_0(x))))
        x = self.pool_1(self.relu_1(self.BatchNorm_1(self.Conv_1(x))))
        x = x.permute(0, 2, 3, 1).flatten(1)
        return self.Dense_1(self.relu_2(self.Dense_0(x)))


class BasicBlockTwin(torch.nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) with the sum as a zennit ``Sum`` module."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout, eps=BN_EPS)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout, eps=BN_EPS)
        self.projection = stride != 1 or cin != cout
        if self.projection:
            self.shortcut_conv = torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.shortcut_bn = torch.nn.BatchNorm2d(cout, eps=BN_EPS)
        self.add = Sum(dim=-1)
        self.relu2 = torch.nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        residual = self.shortcut_bn(self.shortcut_conv(x)) if self.projection else x
        return self.relu2(self.add(torch.stack([y, residual], dim=-1)))


class TinyResNetTwin(torch.nn.Module):
    """stem conv3x3 + BN + ReLU + maxpool 3/2/1, block (identity), block (stride 2, projection), GAP, head."""

    def __init__(self, width: int = RESNET_WIDTH, classes: int = 5):
        super().__init__()
        self.stem_conv = torch.nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(width, eps=BN_EPS)
        self.stem_relu = torch.nn.ReLU()
        self.stem_pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
        self.stage1_block1 = BasicBlockTwin(width, width, 1)
        self.stage2_block1 = BasicBlockTwin(width, 2 * width, 2)
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stem_pool(self.stem_relu(self.stem_bn(self.stem_conv(x))))
        x = self.stage2_block1(self.stage1_block1(x))
        return self.head(self.gap(x).flatten(1))


def load_params(model: torch.nn.Module, data: dict[str, np.ndarray], dtype: torch.dtype) -> None:
    """Flax layout -> twin: Linear weight = kernel.T, Conv2d HWIO -> OIHW, BatchNorm scale/bias/mean/var."""
    for name, module in model.named_modules():
        path = name.replace(".", "/")

        def tensor(key: str, transform=lambda a: a) -> torch.Tensor:
            return torch.tensor(np.ascontiguousarray(transform(data[key])), dtype=dtype)

        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            dense = isinstance(module, torch.nn.Linear)
            to_torch = (lambda k: k.T) if dense else (lambda k: k.transpose(3, 2, 0, 1))
            module.weight = torch.nn.Parameter(tensor(f"params/{path}/kernel", to_torch))
            has_bias = f"params/{path}/bias" in data
            assert has_bias == (module.bias is not None), path
            if has_bias:
                module.bias = torch.nn.Parameter(tensor(f"params/{path}/bias"))
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.weight = torch.nn.Parameter(tensor(f"params/{path}/scale"))
            module.bias = torch.nn.Parameter(tensor(f"params/{path}/bias"))
            module.running_mean = tensor(f"batch_stats/{path}/mean")
            module.running_var = tensor(f"batch_stats/{path}/var")
            assert module.eps == BN_EPS


def build(twin: type, data: dict[str, np.ndarray], dtype: torch.dtype) -> torch.nn.Module:
    model = twin().to(dtype)
    load_params(model, data, dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

# (module path, kernel shape in Flax layout, has bias, BatchNorm path after it or None)
BN_CNN_LAYERS = (
    ("Conv_0", (3, 3, 3, 4), True, "BatchNorm_0"),
    ("Conv_1", (3, 3, 4, 6), True, "BatchNorm_1"),
    ("Dense_0", (24, 10), True, None),
    ("Dense_1", (10, 5), True, None),
)
W = RESNET_WIDTH
RESNET_LAYERS = (
    ("stem_conv", (3, 3, 3, W), False, "stem_bn"),
    ("stage1_block1/conv1", (3, 3, W, W), False, "stage1_block1/bn1"),
    ("stage1_block1/conv2", (3, 3, W, W), False, "stage1_block1/bn2"),
    ("stage2_block1/conv1", (3, 3, W, 2 * W), False, "stage2_block1/bn1"),
    ("stage2_block1/conv2", (3, 3, 2 * W, 2 * W), False, "stage2_block1/bn2"),
    ("stage2_block1/shortcut_conv", (1, 1, W, 2 * W), False, "stage2_block1/shortcut_bn"),
    ("head", (2 * W, 5), True, None),
)


def make_data(layers, input_shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """Kernels N(0, 2/fan_in), biases N(0, 0.1^2), BatchNorm as in the module docstring, x ~ N(0, 1)
    clipped to the box."""
    rng = np.random.default_rng(seed)
    data: dict[str, np.ndarray] = {}
    for name, shape, has_bias, bn in layers:
        std = np.sqrt(2.0 / np.prod(shape[:-1]))
        data[f"params/{name}/kernel"] = (rng.standard_normal(shape) * std).astype(np.float32)
        if has_bias:
            data[f"params/{name}/bias"] = (rng.standard_normal(shape[-1]) * 0.1).astype(np.float32)
        if bn is not None:
            c = shape[-1]
            sign = np.where(rng.uniform(size=c) < 0.3, -1.0, 1.0)
            sign[0] = -1.0
            data[f"params/{bn}/scale"] = (sign * rng.uniform(0.5, 1.5, c)).astype(np.float32)
            data[f"params/{bn}/bias"] = (rng.standard_normal(c) * 0.2).astype(np.float32)
            data[f"batch_stats/{bn}/mean"] = (rng.standard_normal(c) * 0.3).astype(np.float32)
            data[f"batch_stats/{bn}/var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    data["x"] = np.clip(rng.standard_normal(input_shape), gg.BOX_LOW, gg.BOX_HIGH).astype(np.float32)
    return data


def fold(data: dict[str, np.ndarray], layers) -> dict[str, np.ndarray]:
    """Float64 parameters with every BatchNorm folded by hand into the layer before it (rules.md):
    ``s = scale / sqrt(var + eps)``, ``W' = W * s``, ``b' = (b - mean) * s + shift`` (b = 0 without bias)."""
    out = {}
    for name, shape, _, bn in layers:
        kernel = data[f"params/{name}/kernel"].astype(np.float64)
        bias = data.get(f"params/{name}/bias", np.zeros(shape[-1], np.float32)).astype(np.float64)
        if bn is not None:
            s = data[f"params/{bn}/scale"].astype(np.float64) / np.sqrt(
                data[f"batch_stats/{bn}/var"].astype(np.float64) + BN_EPS
            )
            kernel = kernel * s
            bias = (bias - data[f"batch_stats/{bn}/mean"]) * s + data[f"params/{bn}/bias"]
        out[f"params/{name}/kernel"], out[f"params/{name}/bias"] = kernel, bias
    return out


def bias_free(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same network with every BatchNorm mean and shift and every bias set to 0."""
    out = dict(data)
    for key in data:
        if key.endswith("/mean") or (key.startswith("params/") and key.endswith("/bias")):
            out[key] = np.zeros_like(data[key])
    return out


# ---------------------------------------------------------------------------------------------------------
# zennit
# ---------------------------------------------------------------------------------------------------------


def composite(case: gg.Case, canonize: bool):
    """``case``'s hand-built composite, with ``SequentialMergeBatchNorm`` when ``canonize``."""
    canonizers = [SequentialMergeBatchNorm()] if canonize else None
    if case.conv == case.dense:
        affine_map = [(gg.AFFINE, case.conv.make({}))]
    else:
        affine_map = [(torch.nn.Conv2d, case.conv.make({})), (torch.nn.Linear, case.dense.make({}))]
    layer_map = layer_map_base() + affine_map
    if case.first is None:
        return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    first_map = [(gg.AFFINE, case.first.make({}))]
    return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map, canonizers=canonizers)


def case_description(case: gg.Case, first_name: str) -> str:
    return f"{case.describe(first_name)}; canonizers=[SequentialMergeBatchNorm()]; residual: zennit.layer.Sum"


def attribute(model, x: torch.Tensor, target: torch.Tensor, comp) -> tuple[np.ndarray, np.ndarray]:
    output, relevance = gg.attribute(model, x, target, comp)
    # the canonizer must have restored the BatchNorm parameters
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.eps == BN_EPS and float(module.running_var.min()) >= 0.5
    return output, relevance


# ---------------------------------------------------------------------------------------------------------
# Independent numpy reference of rules.md for the tiny ResNet (per sample, flattened in NHWC order)
# ---------------------------------------------------------------------------------------------------------


def conv_matrix(kernel: np.ndarray, size: int, stride: int, pad: int) -> np.ndarray:
    """(H*W*Ci, Ho*Wo*Co) matrix of a square-input cross-correlation with an HWIO kernel."""
    kh, kw, ci, co = kernel.shape
    out = (size + 2 * pad - kh) // stride + 1
    matrix = np.zeros((size, size, ci, out, out, co))
    for h in range(out):
        for w in range(out):
            for a in range(kh):
                for b in range(kw):
                    hi, wi = h * stride + a - pad, w * stride + b - pad
                    if 0 <= hi < size and 0 <= wi < size:
                        matrix[hi, wi, :, h, w, :] = kernel[a, b]
    return matrix.reshape(size * size * ci, out * out * co)


def maxpool_windows(size: int, channels: int, k: int = 3, stride: int = 2, pad: int = 1) -> np.ndarray:
    """(Ho*Wo*C, k*k) flat input indices of the pooling windows in row-major order, -1 for padding."""
    idx = np.arange(size * size * channels).reshape(size, size, channels)
    out = (size + 2 * pad - k) // stride + 1
    windows = np.full((out, out, channels, k * k), -1)
    for h in range(out):
        for w in range(out):
            for a in range(k):
                for b in range(k):
                    hi, wi = h * stride + a - pad, w * stride + b - pad
                    if 0 <= hi < size and 0 <= wi < size:
                        windows[h, w, :, a * k + b] = idx[hi, wi]
    return windows.reshape(-1, k * k)


class ResNetReference:
    """Forward pass and relevance of ``TinyResNetTwin`` from the folded float64 parameters."""

    def __init__(self, data: dict[str, np.ndarray]):
        p = fold(data, RESNET_LAYERS)
        self.x = data["x"].astype(np.float64).reshape(data["x"].shape[0], -1)
        self.layers = {}
        geometry = {  # name: (input size, stride, pad)
            "stem_conv": (8, 1, 1),
            "stage1_block1/conv1": (4, 1, 1),
            "stage1_block1/conv2": (4, 1, 1),
            "stage2_block1/conv1": (4, 2, 1),
            "stage2_block1/conv2": (2, 1, 1),
            "stage2_block1/shortcut_conv": (4, 2, 0),
        }
        for name, shape, _, _ in RESNET_LAYERS:
            kernel, bias = p[f"params/{name}/kernel"], p[f"params/{name}/bias"]
            if name in geometry:
                size, stride, pad = geometry[name]
                matrix = conv_matrix(kernel, size, stride, pad)
                connect = conv_matrix(np.ones_like(kernel), size, stride, pad)
                bias = np.tile(bias, matrix.shape[1] // shape[-1])
            else:
                matrix, connect = kernel, np.ones_like(kernel)
            self.layers[name] = (matrix, bias, connect)
        self.windows = maxpool_windows(8, W)
        self.gap = np.zeros((2 * 2 * 2 * W, 2 * W))
        for pixel in range(4):
            self.gap[pixel * 2 * W : (pixel + 1) * 2 * W] = np.eye(2 * W) / 4
        self.forward()

    def affine(self, name: str, x: np.ndarray) -> np.ndarray:
        matrix, bias, _ = self.layers[name]
        return x @ matrix + bias

    def forward(self) -> None:
        v = {"x": self.x}
        v["stem"] = self.affine("stem_conv", v["x"])
        v["stem_relu"] = np.maximum(v["stem"], 0)
        padded = np.concatenate([v["stem_relu"], np.full((len(self.x), 1), -np.inf)], axis=1)
        v["pool"] = padded[:, self.windows].max(-1)
        for block, block_in in (("stage1_block1", "pool"), ("stage2_block1", "stage1_block1/out")):
            v[f"{block}/z1"] = self.affine(f"{block}/conv1", v[block_in])
            v[f"{block}/a1"] = np.maximum(v[f"{block}/z1"], 0)
            v[f"{block}/y"] = self.affine(f"{block}/conv2", v[f"{block}/a1"])
            if block == "stage2_block1":
                v[f"{block}/residual"] = self.affine(f"{block}/shortcut_conv", v[block_in])
            else:
                v[f"{block}/residual"] = v[block_in]
            v[f"{block}/sum"] = v[f"{block}/y"] + v[f"{block}/residual"]
            v[f"{block}/out"] = np.maximum(v[f"{block}/sum"], 0)
        v["gap"] = v["stage2_block1/out"] @ self.gap
        v["logits"] = self.affine("head", v["gap"])
        self.values = v

    def margins(self) -> dict[str, float]:
        v = self.values
        pre = [v[k] for k in ("stem", "stage1_block1/z1", "stage1_block1/sum", "stage2_block1/z1")]
        pre.append(v["stage2_block1/sum"])
        padded = np.concatenate([v["stem_relu"], np.full((len(self.x), 1), -np.inf)], axis=1)
        windows = np.sort(padded[:, self.windows], -1)
        live = windows[..., -1] > 0
        top = np.sort(v["logits"], -1)
        return {
            "min |pre-activation|": min(np.abs(a).min() for a in pre),
            "min max-pool gap": (windows[..., -1] - windows[..., -2])[live].min(),
            "min logit margin": (top[:, -1] - top[:, -2]).min(),
        }

    def relevance(self, case: gg.Case, target: np.ndarray) -> np.ndarray:
        v = self.values

        def rel(name: str, x: np.ndarray, r: np.ndarray) -> np.ndarray:
            rule = case.first if name == "stem_conv" and case.first is not None else case.conv
            if name == "head":
                rule = case.dense
            matrix, bias, connect = self.layers[name]
            return gg.affine_relevance(rule, x, matrix, bias, connect, r, {})

        def norm_sum(a: np.ndarray, b: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s = r / gg.stab(a + b)
            return a * s, b * s

        r = v["logits"] * np.eye(v["logits"].shape[1])[target]
        r = rel("head", v["gap"], r)
        r = v["stage2_block1/out"] * ((r / gg.stab(v["gap"])) @ self.gap.T)  # Norm on the average pool
        # stage2_block1 (ReLU: Pass)
        r_y, r_res = norm_sum(v["stage2_block1/y"], v["stage2_block1/residual"], r)
        r_a1 = rel("stage2_block1/conv2", v["stage2_block1/a1"], r_y)
        r_in = rel("stage2_block1/conv1", v["stage1_block1/out"], r_a1)
        r_in = r_in + rel("stage2_block1/shortcut_conv", v["stage1_block1/out"], r_res)
        # stage1_block1: identity shortcut
        r_y, r_res = norm_sum(v["stage1_block1/y"], v["stage1_block1/residual"], r_in)
        r_a1 = rel("stage1_block1/conv2", v["stage1_block1/a1"], r_y)
        r_pool = rel("stage1_block1/conv1", v["pool"], r_a1) + r_res
        # max pool: the gradient, all relevance to the first arg-max of each window
        n = len(self.x)
        padded = np.concatenate([v["stem_relu"], np.full((n, 1), -np.inf)], axis=1)
        winners = self.windows[np.arange(len(self.windows)), padded[:, self.windows].argmax(-1)]
        r_stem = np.zeros((n, v["stem_relu"].shape[1] + 1))
        np.add.at(r_stem, (np.arange(n)[:, None], winners), r_pool)
        assert np.all(r_stem[:, -1] == 0)
        return rel("stem_conv", v["x"], r_stem[:, :-1]).reshape(-1, 8, 8, 3)


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def ratio_of(relevance: np.ndarray, logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    return relevance.reshape(len(target), -1).sum(-1) / logits[np.arange(len(target)), target]


def generate(name, data, twin, folded_twin, numpy_reference, margins) -> None:
    """Compute and check every case for one model, then write ``golden_<name>.npz``.

    ``folded_twin(params64)`` builds the plain twin from hand-folded parameters; ``numpy_reference(data,
    case, target)`` returns ``(logits, relevance)`` in NHWC; ``margins(data)`` the forward pass's distances
    from decision boundaries that a float32 re-implementation could flip.
    """
    to_torch = lambda a: torch.tensor(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    from_torch = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
    model64, model32 = build(twin, data, torch.float64), build(twin, data, torch.float32)
    plain64 = folded_twin(fold(data, BN_CNN_LAYERS if twin is BNCNNTwin else RESNET_LAYERS))
    x64, x32 = to_torch(data["x"]).to(torch.float64), to_torch(data["x"]).to(torch.float32)
    with torch.no_grad():
        logits = model64(x64).numpy()
        np.testing.assert_allclose(plain64(x64).numpy(), logits, rtol=1e-12, atol=1e-12)
    target = logits.argmax(-1).astype(np.int64)
    target_t = torch.tensor(target)
    data["target"], data["logits"] = target, logits
    ref_logits, _ = numpy_reference(data, CASES[0], target)
    np.testing.assert_allclose(ref_logits, logits, rtol=1e-12, atol=1e-12)
    print(
        f"\n== {name}: logits[target] = {np.round(logits[np.arange(len(target)), target], 6)}, "
        f"target = {target}"
    )
    print("   " + ", ".join(f"{k} = {v:.3g}" for k, v in margins(data).items()))
    print(f"   {'case':24s} {'sum R / f_c(x) per sample':36s} {'vs fold':>8s} {'vs numpy':>9s} f32 dev")
    results = {}
    for case in CASES:
        output, relevance = attribute(model64, x64, target_t, composite(case, canonize=True))
        np.testing.assert_allclose(output, logits, rtol=1e-12, atol=1e-12)  # merged BatchNorm: rounding only
        relevance = from_torch(relevance)
        scale = np.abs(relevance).max()
        _, by_hand = gg.attribute(plain64, x64, target_t, composite(case, canonize=False))
        fold_dev = np.abs(from_torch(by_hand) - relevance).max() / scale
        assert fold_dev < 1e-10, (name, case.name, fold_dev)
        _, reference = numpy_reference(data, case, target)
        numpy_dev = np.abs(reference - relevance).max() / scale
        assert numpy_dev < 1e-9, (name, case.name, numpy_dev)
        _, relevance32 = attribute(model32, x32, target_t, composite(case, canonize=True))
        f32_dev = np.abs(from_torch(relevance32) - relevance).max() / scale
        ratio = ratio_of(relevance, logits, target)
        print(
            f"   {case.name:24s} {np.array2string(ratio, precision=6, floatmode='fixed'):36s} "
            f"{fold_dev:8.1e} {numpy_dev:9.1e} {f32_dev:8.1e}"
        )
        if twin is BNCNNTwin and case.name in ("DeepTaylor", "DeepTaylorBox"):
            assert np.abs(ratio - 1).max() < 1e-4, (case.name, ratio)
        results[case.name] = relevance
        data[f"relevance/{case.name}"] = relevance.astype(np.float64)
        first = "Conv_0" if twin is BNCNNTwin else "stem_conv"
        data[f"case_desc/{case.name}"] = np.array(case_description(case, first))

    for preset, make in ZENNIT_PRESETS.items():
        _, relevance = attribute(model64, x64, target_t, make(canonizers=[SequentialMergeBatchNorm()]))
        dev = np.abs(from_torch(relevance) - results[preset]).max() / np.abs(results[preset]).max()
        print(f"   zennit.composites.{preset}(canonizers=[merge BN]) vs hand-built: max rel. dev {dev:.1e}")
        assert dev < 1e-12, (name, preset, dev)

    if twin is TinyResNetTwin:
        free = bias_free(data)
        model_free = build(twin, free, torch.float64)
        case = next(c for c in CASES if c.name == "DeepTaylor")
        output, relevance = attribute(model_free, x64, target_t, composite(case, canonize=True))
        relevance = from_torch(relevance)
        ref_logits, reference = numpy_reference(free, case, target)
        np.testing.assert_allclose(ref_logits, output, rtol=1e-12, atol=1e-12)
        assert np.abs(reference - relevance).max() / np.abs(relevance).max() < 1e-9
        ratio = ratio_of(relevance, output, target)
        print(
            f"   bias-free DeepTaylor: f_c(x) = {np.round(output[np.arange(len(target)), target], 6)}, "
            f"sum R / f_c(x) = {np.array2string(ratio, precision=6, floatmode='fixed')} "
            f"(lost {np.array2string(1 - ratio, precision=4, floatmode='fixed')})"
        )
        data["logits_biasfree"] = output.astype(np.float64)
        data["relevance_biasfree/DeepTaylor"] = relevance.astype(np.float64)

    data["cases"] = np.array([case.name for case in CASES])
    path = OUT_DIR / f"golden_{name}.npz"
    gg.save_npz(path, data)
    with np.load(path, allow_pickle=False) as check:
        assert set(check.files) == set(data), set(check.files) ^ set(data)
        for key, value in data.items():
            np.testing.assert_array_equal(check[key], value)
    print(f"   wrote {path} ({path.stat().st_size / 1024:.1f} KiB, {len(data)} arrays)")


def bn_cnn_reference(data, case, target):
    folded = fold(data, BN_CNN_LAYERS)
    folded.update(x=data["x"], zbox_low=np.zeros(1), zbox_high=np.zeros(1))
    return gg.reference_relevance(gg.CNN, folded, case, target)


def resnet_reference(data, case, target):
    ref = ResNetReference(data)
    return ref.values["logits"], ref.relevance(case, target)


def plain_cnn(params64: dict[str, np.ndarray]) -> torch.nn.Module:
    """``generate_golden.CNNTwin`` (no BatchNorm) with the hand-folded parameters."""
    model = gg.CNNTwin().to(torch.float64)
    load_params(model, params64, torch.float64)
    return model.eval()


def plain_resnet(params64: dict[str, np.ndarray]) -> torch.nn.Module:
    """The tiny ResNet with BatchNorm folded by hand: biased convolutions, BatchNorms as identities."""
    model = TinyResNetTwin().to(torch.float64)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(parent, child_name, torch.nn.Identity())
            elif isinstance(child, torch.nn.Conv2d):
                child.bias = torch.nn.Parameter(torch.zeros(child.out_channels, dtype=torch.float64))
    load_params(model, params64, torch.float64)
    return model.eval()


def main() -> None:
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, zennit {importlib.metadata.version('zennit')}")
    bn_cnn = make_data(BN_CNN_LAYERS, (3, 8, 8, 3), seed=20246)
    generate(
        "bn_cnn",
        bn_cnn,
        BNCNNTwin,
        plain_cnn,
        bn_cnn_reference,
        lambda data: gg.forward_margins(gg.CNN, fold(data, BN_CNN_LAYERS) | {"x": data["x"]}),
    )
    resnet = make_data(RESNET_LAYERS, (2, 8, 8, 3), seed=20262)
    generate(
        "resnet",
        resnet,
        TinyResNetTwin,
        plain_resnet,
        resnet_reference,
        lambda data: ResNetReference(data).margins(),
    )


if __name__ == "__main__":
    main()
