"""Generate ``golden_crp.npz``: zennit-crp (concept relevance propagation) references for the jaxdtd tests.

Run from the repository root, in a venv of its own (``.venv-ref``, git-ignored; not the project's)::

    python3.11 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0 numpy tqdm
    .venv-ref/bin/pip install --no-deps --ignore-requires-python zennit==1.0.0 click
    .venv-ref/bin/pip install --no-deps zennit-crp==0.6.0
    .venv-ref/bin/python tests/reference/generate_golden_crp.py

No jax, torchvision, Pillow or matplotlib: zennit and zennit-crp import them at import time although nothing
used here needs them, so stand-ins for exactly the imported names go into ``sys.modules`` when they are
missing (zennit's from ``generate_golden.py``, which this script loads by path, crp's below).

What it computes, on the PyTorch twin ``CNNTwin`` of the Flax ``CNN`` (``tests/models.py``) with the weights
of ``golden_cnn.npz``, in float64, for a dataset of 32 inputs with random labels (not the predictions):

1. plain CRP attributions (``CondAttribution``, conditions ``{"y": [label]}``) of samples 0-3: input
   relevance, heatmap, recorded relevances/activations of Conv_0, Conv_1, Dense_0 and their
   ``ChannelConcept`` relevances (``abs_norm`` False and True), composites ``EpsilonPlus`` and
   ``EpsilonAlpha2Beta1``;
2. conditional attributions of sample 0 under a list of conditions (masks on Conv_0 / Conv_1 / Dense_0),
   both composites;
3. start-layer attributions as ``FeatureVisualization`` computes them (``start_layer`` Conv_1 / Dense_0,
   relevance initialised with that layer's output), per channel and per single neuron (``mask_rf``);
4. ``FeatureVisualization.run`` (relevance and activation maximization) over the 32 samples and
   ``get_max_reference`` for two Conv_1 concepts.

Everything is checked before writing against computations that do not use crp's masking (zennit's
``Gradient`` attributor on truncated copies of the twin, numpy sums and sorts) in each part's function.

zennit-crp 0.6.0 declares ``zennit<=0.4.6``. With zennit 1.0.0 a ``start_layer`` backward raises
``KeyError: 'grad_output'`` (zennit 1.0 stores a module's output gradient on an ``Identity`` node *after* the
module's output, which a backward that starts at that output never passes). ``start_layer_compat`` makes the
rule hooks also store the gradient arriving at the module's raw output, which is what zennit 0.4.6 does; it is
active only around the start-layer calls, and the script asserts both the KeyError without it and the result
with it (against the independent computation). See the README.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import sys
import tempfile
import types
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _load_generate_golden() -> types.ModuleType:
    """``generate_golden.py`` is not a package: load it by path (this also installs its zennit stand-ins)."""
    spec = importlib.util.spec_from_file_location("generate_golden", HERE / "generate_golden.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


GG = _load_generate_golden()


def _stand_in(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    for key, value in attributes.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def _install_crp_import_stubs() -> None:
    """Stand-ins for what zennit-crp imports beyond zennit's stand-ins, only when missing.

    ``crp.image`` (imported by ``crp.visualization``) does ``from torchvision.transforms.functional import
    gaussian_blur``, ``import matplotlib.pyplot``, ``import matplotlib.gridspec`` and ``from PIL import
    Image``, and names ``Image.Image`` in its annotations; ``crp.cache`` does ``from PIL import Image``
    (``PIL.Image`` is generate_golden.py's stand-in). Only crp's plotting functions use them, and this
    script passes its own ``plot_fn``.
    """
    pil_image = sys.modules.get("PIL.Image")
    if (
        pil_image is not None
        and getattr(pil_image, "__file__", None) is None
        and not hasattr(pil_image, "Image")
    ):

        class Image:
            """Stand-in for PIL.Image.Image (crp.image's annotations only)."""

        pil_image.Image = Image
    torchvision = sys.modules.get("torchvision")
    if (
        torchvision is not None and getattr(torchvision, "__file__", None) is None
    ):  # generate_golden's stand-in

        def gaussian_blur(*args, **kwargs):
            raise NotImplementedError("stand-in for torchvision's gaussian_blur (crp.image plotting only)")

        functional = _stand_in("torchvision.transforms.functional", gaussian_blur=gaussian_blur)
        torchvision.transforms = _stand_in("torchvision.transforms", functional=functional)
    if "matplotlib" not in sys.modules and importlib.util.find_spec("matplotlib") is None:
        pyplot = _stand_in("matplotlib.pyplot")
        gridspec = _stand_in("matplotlib.gridspec")
        _stand_in("matplotlib", pyplot=pyplot, gridspec=gridspec)


_install_crp_import_stubs()

import zennit.core  # noqa: E402
from crp.attribution import CondAttribution  # noqa: E402
from crp.concepts import ChannelConcept  # noqa: E402
from crp.helper import load_maximization  # noqa: E402
from crp.visualization import FeatureVisualization  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlus  # noqa: E402

OUT_PATH = HERE / "golden_crp.npz"
CNN_PATH = HERE / "golden_cnn.npz"
SEED = 20250
N_DATA, N_PLAIN, N_CLASSES = 32, 4, 5
LAYERS = ("Conv_0", "Conv_1", "Dense_0")
CASES: dict[str, Callable] = {"EpsilonPlus": EpsilonPlus, "EpsilonAlpha2Beta1": EpsilonAlpha2Beta1}
MAIN = "EpsilonPlus"
FV_BATCH = 8
REF_LAYER, REF_CONCEPTS, REF_RANGE = "Conv_1", (0, 3), (0, 4)
# (channel, flat spatial index n = h * 4 + w of Conv_1's 4x4 output) for the mask_rf start-layer case
RF_PAIRS_CONV1 = ((0, 0), (1, 5), (2, 10), (3, 15), (5, 6), (4, 9))
RF_NEURONS_DENSE0 = (0, 4, 7)
TIE_RTOL = 1e-9  # two sorted values closer than this (relative to the column's max |value|) count as tied
CHECK_RTOL = 1e-12  # agreement of independent float64 computations, relative to max |reference|


# ---------------------------------------------------------------------------------------------------------
# layout helpers and checks
# ---------------------------------------------------------------------------------------------------------


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """torch (NCHW for 4-d) -> numpy in the Flax layout (NHWC), float64 / int64 as computed."""
    array = tensor.detach().cpu().numpy()
    return array.transpose(0, 2, 3, 1).copy() if array.ndim == 4 else array.copy()


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.tensor(x_nhwc.transpose(0, 3, 1, 2).copy(), dtype=torch.float64)


def assert_close(actual, expected, what: str, rtol: float = CHECK_RTOL) -> float:
    """|actual - expected| <= rtol * max|expected| elementwise; returns the relative max deviation."""
    actual, expected = (
        np.asarray(a.detach() if isinstance(a, torch.Tensor) else a, np.float64) for a in (actual, expected)
    )
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()), 1e-300)
    deviation = float(np.abs(actual - expected).max()) / scale
    assert deviation <= rtol, f"{what}: relative deviation {deviation:.3g} > {rtol:g}"
    return deviation


def channel_mask(shape: tuple[int, ...], channels) -> torch.Tensor:
    """Ones on the given channels (torch axis 1) of a (N, C, ...) tensor."""
    mask = torch.zeros(shape, dtype=torch.float64)
    mask[:, list(channels)] = 1.0
    return mask


def neuron_mask(shape: tuple[int, ...], channel: int, neuron: int) -> torch.Tensor:
    """One on (channel, flat spatial index ``neuron``) of a (N, C, H, W) or (N, C) tensor."""
    mask = torch.zeros(shape, dtype=torch.float64)
    mask.view(shape[0], shape[1], -1)[:, channel, neuron] = 1.0
    return mask


def encode(conditions: list[dict]) -> np.ndarray:
    """Conditions as a unicode array of JSON strings (dict keys become strings in JSON)."""
    return np.array([json.dumps(c, default=int) for c in conditions])


# ---------------------------------------------------------------------------------------------------------
# model, data, independent reference
# ---------------------------------------------------------------------------------------------------------


def load_params() -> dict[str, np.ndarray]:
    with np.load(CNN_PATH, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files if key.startswith("params/")}


def build_model(params: dict[str, np.ndarray]) -> torch.nn.Module:
    model = GG.CNNTwin().to(torch.float64)
    GG.load_flax_params(model, params, torch.float64)
    return model.eval()


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    x = np.clip(rng.standard_normal((N_DATA, 8, 8, 3)), -4.0, 4.0).astype(np.float32)
    label = rng.integers(0, N_CLASSES, size=N_DATA).astype(np.int64)
    return x, label


class Truncated(torch.nn.Module):
    """The twin's forward pass up to and including the output of module ``last`` (sharing its modules).

    Used for the independent reference: zennit's ``Gradient`` on it with ``attr_output = R`` propagates a
    given relevance ``R`` at ``last``'s output down to the input with the same rules, without crp.
    """

    def __init__(self, twin: torch.nn.Module, last: str):
        super().__init__()
        assert last in LAYERS, last
        self.twin, self.last = twin, last

    def forward(self, x):
        t = self.twin
        x = t.Conv_0(x)
        if self.last == "Conv_0":
            return x
        x = t.Conv_1(t.pool_0(t.relu_0(x)))
        if self.last == "Conv_1":
            return x
        return t.Dense_0(t.pool_1(t.relu_1(x)).permute(0, 2, 3, 1).flatten(1))


def lrp_from_layer(model, case: str, x: torch.Tensor, last: str, relevance: torch.Tensor) -> torch.Tensor:
    """Input relevance (NCHW) for ``relevance`` placed at the output of ``last``, by zennit alone."""
    x = x.detach().clone().requires_grad_(True)
    with Gradient(model=Truncated(model, last), composite=CASES[case]()) as attributor:
        _, input_relevance = attributor(x, attr_output=lambda _: relevance)
    return input_relevance


# ---------------------------------------------------------------------------------------------------------
# zennit 1.0 / crp 0.6 start-layer compatibility
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def start_layer_compat():
    """Let zennit 1.0 rule hooks also store the gradient at a module's *raw* output (zennit 0.4.6 behaviour).

    zennit 1.0's ``Hook.post_forward`` puts an ``Identity`` after the module output and stores the output
    gradient when the backward passes that node. crp's ``start_layer`` backward starts *at* the raw output
    (the tensor its forward hook recorded, before zennit's Identity), so the rule of the start layer finds
    no stored gradient. Here each hook additionally registers a tensor hook on the raw output that stores the
    gradient arriving there; it runs after crp's mask hook (registered earlier on the same tensor), so it
    stores the masked gradient, as zennit 0.4.6 did. In a full backward both stores see the same tensor.
    """
    original = zennit.core.Hook.post_forward

    def post_forward(self, module, args, kwargs, output):
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            hook_ref = weakref.ref(self)

            def store(grad):
                hook = hook_ref()
                if hook is not None and hook.active:
                    hook.stored_tensors["grad_output"] = (grad,)

            self.tensor_handles.append(output.register_hook(store))
        return original(self, module, args, kwargs, output)

    zennit.core.Hook.post_forward = post_forward
    try:
        yield
    finally:
        zennit.core.Hook.post_forward = original


def assert_start_layer_needs_compat(model: torch.nn.Module, x0: torch.Tensor) -> None:
    """Without the shim, crp 0.6.0 + zennit 1.0.0 fail at a start layer. On a copy of the model: the failed
    call leaves crp's recording hooks registered."""
    attribution = CondAttribution(copy.deepcopy(model))
    try:
        attribution(x0.clone().requires_grad_(True), [{"Conv_1": [0]}], EpsilonPlus(), start_layer="Conv_1")
    except KeyError as error:
        assert error.args == ("grad_output",), error
        return
    raise AssertionError("start_layer worked without start_layer_compat: the zennit incompatibility is gone")


# ---------------------------------------------------------------------------------------------------------
# 1. plain attribution
# ---------------------------------------------------------------------------------------------------------


def plain(attribution, model, case, x, label, logits) -> tuple[dict[str, np.ndarray], list[str]]:
    data = x[:N_PLAIN].clone().requires_grad_(True)
    conditions = [{"y": [int(t)]} for t in label[:N_PLAIN]]
    attr = attribution(data, conditions, CASES[case](), record_layer=list(LAYERS))
    out = {
        f"{case}/input_relevance": to_numpy(data.grad),
        f"{case}/heatmap": to_numpy(attr.heatmap),
    }
    assert_close(attr.heatmap, data.grad.sum(1), f"{case} heatmap = input grad summed over C", rtol=0)
    assert_close(attr.prediction, logits[:N_PLAIN], f"{case} prediction = logits")

    target_logit = logits[np.arange(N_PLAIN), label[:N_PLAIN]]
    report = [f"{case}: sum R / logit[label] per sample (samples 0-{N_PLAIN - 1}):"]
    concept = ChannelConcept()
    for layer in LAYERS:
        rel, act = attr.relevances[layer], attr.activations[layer]
        unnormed = concept.attribute(rel, abs_norm=False)
        normed = concept.attribute(rel, abs_norm=True)
        out[f"{case}/relevances/{layer}"] = to_numpy(rel)
        out[f"{case}/activations/{layer}"] = to_numpy(act)
        out[f"{case}/concept_relevance/{layer}"] = to_numpy(unnormed)
        out[f"{case}/concept_relevance_absnorm/{layer}"] = to_numpy(normed)

        rel_np = rel.numpy().reshape(N_PLAIN, rel.shape[1], -1)
        assert_close(unnormed, rel_np.sum(-1), f"{case} {layer} concept relevance = spatial sum")
        reference = rel_np.sum(-1) / (np.abs(rel_np.sum(-1)).sum(-1, keepdims=True) + 1e-10)
        assert_close(normed, reference, f"{case} {layer} abs_norm = R_c / (sum_c |R_c| + 1e-10)")
        assert_close(unnormed.sum(1), rel_np.sum((1, 2)), f"{case} {layer} concepts sum to the layer total")
        ratio = rel_np.sum((1, 2)) / target_logit
        report.append(f"  {layer:8s} {np.array2string(ratio, precision=4)}")
        if case == "EpsilonPlus":  # ZPlus/Epsilon with biases: conservative up to the biases' share
            large = np.abs(target_logit) > 0.3  # sample 0's label logit is -0.034: its ratios mean nothing
            assert np.all(np.abs(ratio[large] - 1) < 0.3), (layer, ratio)
    assert_close(attr.activations["Dense_0"], Truncated(model, "Dense_0")(x[:N_PLAIN]), "Dense_0 activation")

    # independent: zennit's Gradient on the whole twin with output * onehot(label)
    onehot = torch.nn.functional.one_hot(torch.tensor(label[:N_PLAIN]), N_CLASSES).to(torch.float64)
    reference = x[:N_PLAIN].clone().requires_grad_(True)
    with Gradient(model=model, composite=CASES[case]()) as attributor:
        _, rel_in = attributor(reference, attr_output=lambda out: out * onehot)
    assert_close(data.grad, rel_in, f"{case} input relevance = zennit Gradient(output * onehot(label))")
    for layer in LAYERS:  # the input relevance is the lower part applied to the recorded layer relevance
        rel_in = lrp_from_layer(model, case, x[:N_PLAIN], layer, attr.relevances[layer])
        assert_close(data.grad, rel_in, f"{case} input relevance from the recorded {layer} relevance")
    return out, report


# ---------------------------------------------------------------------------------------------------------
# 2. conditional heatmaps of one sample
# ---------------------------------------------------------------------------------------------------------


def condition_list(label0: int) -> list[dict]:
    y = {"y": [label0]}
    return [
        dict(y),
        {**y, "Conv_1": [2]},
        {**y, "Conv_1": [0, 3]},
        {**y, "Conv_0": [1]},
        {**y, "Dense_0": [4]},
        {**y, "Dense_0": [1, 7]},
        {**y, "Conv_1": [2], "Conv_0": [1]},
        {"y": [(label0 + 1) % N_CLASSES], "Conv_1": [2]},
        *({**y, "Conv_1": [c]} for c in range(6)),
    ]


def grouped_order(conditions: list[dict]) -> list[int]:
    """Order of crp's rows with exclude_parallel=True: grouped by the set of condition keys (first
    appearance), the original order within each group."""
    groups: dict[frozenset, list[int]] = {}
    for i, cond in enumerate(conditions):
        groups.setdefault(frozenset(cond), []).append(i)
    return [i for group in groups.values() for i in group]


def conditional(attribution, model, case, x, label) -> tuple[dict[str, np.ndarray], list[str]]:
    label0 = int(label[0])
    conditions = condition_list(label0)
    k = len(conditions)
    # full input relevance: the sample repeated k times as a leaf (crp pairs sample i with condition i)
    data = x[:1].repeat(k, 1, 1, 1).requires_grad_(True)
    attr = attribution(data, conditions, CASES[case](), record_layer=list(LAYERS), exclude_parallel=False)
    out = {
        f"{case}/cond/conditions": encode(conditions),
        f"{case}/cond/input_relevance": to_numpy(data.grad),
        f"{case}/cond/heatmap": to_numpy(attr.heatmap),
    }
    for layer in LAYERS:
        out[f"{case}/cond/relevances/{layer}"] = to_numpy(attr.relevances[layer])

    # crp's own broadcast of one sample, both exclude_parallel settings
    broadcast = {}
    for flag in (False, True):
        sample = x[:1].clone().requires_grad_(True)
        broadcast[flag] = attribution(
            sample, conditions, CASES[case](), record_layer=list(LAYERS), exclude_parallel=flag
        )
    assert_close(
        broadcast[False].heatmap, attr.heatmap, f"{case} broadcast heatmap = repeated-leaf heatmap", 0
    )
    # exclude_parallel=True: rows come grouped by the set of condition keys; the heatmaps are the same, but
    # the recorded relevance of every layer *named in the condition* is exactly twice the masked relevance
    # (partial backward: torch.autograd.grad to that layer's output, then a backward from it, and the
    # retain_grad of that output accumulates in both)
    order = grouped_order(conditions)
    inverse = np.argsort(order)
    dev = assert_close(
        broadcast[True].heatmap[inverse], attr.heatmap, f"{case} exclude_parallel heatmap", 1e-14
    )
    for layer in LAYERS:
        factor = torch.tensor([2.0 if layer in cond else 1.0 for cond in conditions], dtype=torch.float64)
        factor = factor.view(-1, *[1] * (attr.relevances[layer].ndim - 1))
        rel_true = broadcast[True].relevances[layer][inverse]
        assert_close(
            rel_true, factor * attr.relevances[layer], f"{case} exclude_parallel {layer} doubled", 1e-14
        )
        out[f"{case}/cond/relevances_exclude_parallel/{layer}"] = to_numpy(rel_true)
    report = [
        f"{case}: exclude_parallel=True vs False: heatmaps equal (rel. dev {dev:.1g}); recorded relevance of "
        f"each layer named in a condition is 2x with True (crp's rows grouped by condition keys: {order})"
    ]

    # independent checks of the masks
    base = attr.relevances  # row 0 is the unconditional {"y": [label0]}
    for i, cond in enumerate(conditions):
        masked = [name for name in cond if name != "y"]
        for layer in masked:
            masked_above = [name for name in masked if LAYERS.index(name) > LAYERS.index(layer)]
            if not masked_above and cond["y"] == [label0]:  # else the relevance arriving at layer differs
                expected = base[layer][:1] * channel_mask(base[layer][:1].shape, cond[layer])
                assert_close(
                    attr.relevances[layer][i : i + 1], expected, f"{case} {cond}: {layer} = R * mask", 1e-14
                )
        # the input relevance is the lower part applied to the (masked) relevance recorded at each layer
        # that has no masked layer below it
        lowest = min((LAYERS.index(name) for name in masked), default=len(LAYERS))
        for layer in LAYERS[: lowest + 1]:
            rel_in = lrp_from_layer(model, case, x[:1], layer, attr.relevances[layer][i : i + 1])
            assert_close(data.grad[i : i + 1], rel_in, f"{case} {cond}: input relevance from {layer}")
    two = conditions.index({"y": [label0], "Conv_1": [2], "Conv_0": [1]})
    one = conditions.index({"y": [label0], "Conv_1": [2]})
    expected = attr.relevances["Conv_0"][one : one + 1] * channel_mask((1, 4, 8, 8), [1])
    assert_close(
        attr.relevances["Conv_0"][two : two + 1], expected, f"{case} two-layer mask at Conv_0", 1e-14
    )
    per_channel = [conditions.index({"y": [label0], "Conv_1": [c]}) for c in range(6)]
    deviation = assert_close(
        data.grad[per_channel].sum(0), data.grad[0], f"{case} sum_c R(Conv_1: c) = R", 1e-13
    )
    report.append(
        f"{case}: Conv_1 per-channel input relevances sum to the unconditional one (rel. dev {deviation:.1g})"
    )
    return out, report


# ---------------------------------------------------------------------------------------------------------
# 3. start-layer heatmaps (as FeatureVisualization computes its reference heatmaps)
# ---------------------------------------------------------------------------------------------------------


def start_layer_case(attribution, model, x0, layer, conditions, mask_map, masks) -> dict[str, np.ndarray]:
    """crp with start_layer=layer (default init_rel: the layer's raw output) for one sample and several
    conditions; ``masks[i]`` is the mask condition i means, for the independent check."""
    k = len(conditions)
    data = x0.repeat(k, 1, 1, 1).requires_grad_(True)
    record = list(LAYERS[: LAYERS.index(layer) + 1])
    with start_layer_compat():
        attr = attribution(
            data, conditions, EpsilonPlus(), record_layer=record, mask_map=mask_map, start_layer=layer
        )
        sample = x0.clone().requires_grad_(True)
        broadcast = attribution(sample, conditions, EpsilonPlus(), mask_map=mask_map, start_layer=layer)
    assert_close(broadcast.heatmap, attr.heatmap, f"start {layer}: broadcast = repeated leaf", 0)
    activation = Truncated(model, layer)(x0)
    assert_close(attr.prediction, activation.repeat(k, *[1] * (activation.ndim - 1)), "start prediction", 0)
    for i, mask in enumerate(masks):
        expected = activation * mask
        assert_close(
            attr.relevances[layer][i : i + 1], expected, f"start {layer} {conditions[i]}: R = a * mask", 0
        )
        rel_in = lrp_from_layer(model, MAIN, x0, layer, expected)
        assert_close(data.grad[i : i + 1], rel_in, f"start {layer} {conditions[i]}: input relevance")
    out = {
        "conditions": encode(conditions),
        "input_relevance": to_numpy(data.grad),
        "heatmap": to_numpy(attr.heatmap),
    }
    out.update({f"relevances/{name}": to_numpy(attr.relevances[name]) for name in record})
    return out


def start_layer_all(attribution, model, x) -> tuple[dict[str, np.ndarray], list[str]]:
    x0 = x[:1]
    assert_start_layer_needs_compat(model, x0)
    shapes = {"Conv_1": (1, 6, 4, 4), "Dense_0": (1, 10)}
    out: dict[str, np.ndarray] = {}
    for layer, rf_pairs in (("Conv_1", RF_PAIRS_CONV1), ("Dense_0", [(j, 0) for j in RF_NEURONS_DENSE0])):
        channels = range(shapes[layer][1])
        result = start_layer_case(
            attribution,
            model,
            x0,
            layer,
            [{layer: [c]} for c in channels],
            ChannelConcept.mask,
            [channel_mask(shapes[layer], [c]) for c in channels],
        )
        result["channel"] = np.array(list(channels), dtype=np.int64)
        out.update({f"{MAIN}/start/{layer}/{key}": value for key, value in result.items()})
        result = start_layer_case(
            attribution,
            model,
            x0,
            layer,
            [{layer: {c: n}} for c, n in rf_pairs],
            ChannelConcept.mask_rf,
            [neuron_mask(shapes[layer], c, n) for c, n in rf_pairs],
        )
        result["channel"] = np.array([c for c, _ in rf_pairs], dtype=np.int64)
        result["neuron"] = np.array([n for _, n in rf_pairs], dtype=np.int64)
        out.update({f"{MAIN}/start_rf/{layer}/{key}": value for key, value in result.items()})
    # a linear layer has one "spatial" position: mask_rf {j: 0} equals mask [j]
    rf_rows = out[f"{MAIN}/start_rf/Dense_0/input_relevance"]
    assert_close(
        rf_rows, out[f"{MAIN}/start/Dense_0/input_relevance"][list(RF_NEURONS_DENSE0)], "Dense_0 rf", 0
    )
    totals = out[f"{MAIN}/start/Conv_1/relevances/Conv_1"].sum((1, 2))
    report = [
        f"start_layer Conv_1, sample 0: init relevance per channel (sum of raw Conv_1 output) "
        f"{np.array2string(totals.diagonal(), precision=4)}"
    ]
    return out, report


# ---------------------------------------------------------------------------------------------------------
# 4. FeatureVisualization
# ---------------------------------------------------------------------------------------------------------


class LabelledData(torch.utils.data.Dataset):
    """(NCHW float64 sample, int label) pairs, what FeatureVisualization's dataset must return."""

    def __init__(self, x: torch.Tensor, label: np.ndarray):
        self.x, self.label = x, label

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index].clone(), int(self.label[index])


def keep_raw(samples, heatmaps, rf):
    """plot_fn for get_max_reference: return the reference samples and heatmaps unchanged."""
    return samples, heatmaps


def tie_masks(values: np.ndarray) -> tuple[np.ndarray, int]:
    """``distinct[i, c]``: the sorted value at row i of column c differs (by more than TIE_RTOL of the
    column's max |value|) from every other value of the column, so its sample index is determined."""
    distinct = np.ones(values.shape, dtype=bool)
    for c in range(values.shape[1]):
        column = values[:, c]
        tol = TIE_RTOL * max(float(np.abs(column).max()), 1e-300)
        gaps = np.abs(column[:, None] - column[None, :])
        np.fill_diagonal(gaps, np.inf)
        distinct[:, c] = gaps.min(1) > tol
    return distinct, int((~distinct).sum())


def tie_report(mode: str, layer: str, values: np.ndarray, distinct: np.ndarray, source: torch.Tensor) -> str:
    """Ties, exact zeros, all-zero channels, smallest relative gap between neighbouring sorted values."""
    zero_channels = np.flatnonzero(
        (source.detach().numpy().reshape(N_DATA, source.shape[1], -1) == 0).all((0, 2))
    )
    scale = np.maximum(np.abs(values).max(0, keepdims=True), 1e-300)
    gaps = np.abs(np.diff(values, axis=0)) / scale
    both = distinct[1:] & distinct[:-1]
    min_gap = f"{gaps[both].min():.1e}" if both.any() else "-"
    return (
        f"fv {mode:10s} {layer:8s}: {(~distinct).sum():3d} of {values.size} sorted entries tied "
        f"({(values == 0).sum()} exactly 0); all-zero channels {zero_channels.tolist()}; "
        f"min relative gap between distinct neighbours {min_gap}"
    )


def dead_report(activation: torch.Tensor, relevance: torch.Tensor) -> str:
    """Dense_0 neurons whose ReLU output (and so relevance) is 0 on every sample."""
    inactive = (activation <= 0).all(0).numpy()
    no_relevance = (relevance == 0).all(0).numpy()
    assert np.array_equal(inactive, no_relevance), (inactive, no_relevance)
    per_sample = (relevance == 0).sum(1).numpy()
    return (
        f"Dense_0 over the 32 samples: neurons {np.flatnonzero(inactive).tolist()} have a negative "
        f"pre-activation on every sample, so zero relevance everywhere; zero-relevance neurons per sample "
        f"{per_sample.min()}-{per_sample.max()} of {relevance.shape[1]}"
    )


def expected_maximization(values: torch.Tensor) -> dict[str, np.ndarray]:
    """Independent reference of ChannelConcept.reference_sampling over the whole dataset (max_target='sum',
    abs_norm=True): values, argmax neuron, and whether that argmax is unique."""
    flat = values.detach().numpy().reshape(values.shape[0], values.shape[1], -1)
    summed = flat.sum(-1)
    normed = summed / (np.abs(summed).sum(-1, keepdims=True) + 1e-10)
    rf = flat.argmax(-1)
    rf_unique = (flat == flat.max(-1, keepdims=True)).sum(-1) == 1
    return {"normed": normed, "rf": rf, "rf_unique": rf_unique}


def feature_visualization(attribution, model, x, label) -> tuple[dict[str, np.ndarray], list[str]]:
    dataset = LabelledData(x, label)
    layer_map = {layer: ChannelConcept() for layer in LAYERS}
    out: dict[str, np.ndarray] = {}
    report = []
    with tempfile.TemporaryDirectory() as path:
        fv = FeatureVisualization(attribution, dataset, layer_map, preprocess_fn=None, path=path)
        fv.run(EpsilonPlus(), 0, N_DATA, batch_size=FV_BATCH)

        # independent: one plain crp call over all 32 samples, targets = the dataset's labels
        data = x.clone().requires_grad_(True)
        conditions = [{"y": [int(t)]} for t in label]
        full = attribution(data, conditions, EpsilonPlus(), record_layer=list(LAYERS), exclude_parallel=False)
        folders = {"relevance": fv.RelMax.PATH, "activation": fv.ActMax.PATH}
        sources = {"relevance": full.relevances, "activation": full.activations}
        for mode, folder in folders.items():
            for layer in LAYERS:
                d_sorted, rel_sorted, rf_sorted = (np.array(a) for a in load_maximization(folder, layer))
                prefix = f"{MAIN}/fv/{mode}/{layer}"
                assert d_sorted.shape == (min(40, N_DATA), sources[mode][layer].shape[1]), d_sorted.shape
                distinct, n_tied = tie_masks(rel_sorted)
                ref = expected_maximization(sources[mode][layer])
                expected_sorted = -np.sort(-ref["normed"], axis=0)
                assert_close(rel_sorted, expected_sorted, f"fv {mode} {layer} sorted values", 1e-12)
                columns = np.arange(d_sorted.shape[1])[None, :]
                assert_close(
                    ref["normed"][d_sorted, columns], rel_sorted, f"fv {mode} {layer} value of index", 1e-12
                )
                # where the value is distinct, the sample index is determined, and so is its rf index: torch's
                # argmax takes the first maximum, like numpy's (non-unique maxima are exact zeros here)
                expected_index = np.argsort(-ref["normed"], axis=0, kind="stable")
                assert np.array_equal(d_sorted[distinct], expected_index[distinct]), (mode, layer)
                assert np.array_equal(rf_sorted[distinct], ref["rf"][d_sorted, columns][distinct]), (
                    mode,
                    layer,
                )
                out.update(
                    {
                        f"{prefix}/d_c_sorted": d_sorted,
                        f"{prefix}/rel_c_sorted": rel_sorted,
                        f"{prefix}/rf_c_sorted": rf_sorted,
                        f"{prefix}/distinct": distinct,
                        f"{prefix}/rf_unique": ref["rf_unique"][d_sorted, columns],
                        f"{prefix}/per_sample": ref["normed"],
                        f"{prefix}/per_sample_rf": ref["rf"],
                    }
                )
                report.append(tie_report(mode, layer, rel_sorted, distinct, sources[mode][layer]))
            if mode == "relevance":
                report.append(dead_report(full.activations["Dense_0"], full.relevances["Dense_0"]))
        for mode in folders:
            for c in REF_CONCEPTS:  # the reference samples (top REF_RANGE) must be determined
                top = out[f"{MAIN}/fv/{mode}/{REF_LAYER}/distinct"][: REF_RANGE[1] + 1, c]
                assert top.all(), (mode, c, top)

        out.update(max_references(fv, model, x))
    return out, report


def max_references(fv: FeatureVisualization, model, x) -> dict[str, np.ndarray]:
    """``get_max_reference`` for REF_CONCEPTS of REF_LAYER, both modes, rf True and False, checked against
    the stored maximization arrays and zennit's Gradient from ``activation * mask`` at REF_LAYER."""
    folders = {"relevance": fv.RelMax.PATH, "activation": fv.ActMax.PATH}
    out: dict[str, np.ndarray] = {}
    for mode, folder in folders.items():
        d_sorted, _, rf_sorted = (np.array(a) for a in load_maximization(folder, REF_LAYER))
        for rf in (True, False):
            with start_layer_compat():
                refs = fv.get_max_reference(
                    list(REF_CONCEPTS),
                    REF_LAYER,
                    mode=mode,
                    r_range=REF_RANGE,
                    composite=EpsilonPlus(),
                    rf=rf,
                    plot_fn=keep_raw,
                )
            for c in REF_CONCEPTS:
                samples, heatmaps = refs[c]
                indices = d_sorted[REF_RANGE[0] : REF_RANGE[1], c]
                neurons = rf_sorted[REF_RANGE[0] : REF_RANGE[1], c]
                assert_close(samples, x[indices], f"reference samples {mode} {c}", 0)
                for i, (index, neuron) in enumerate(zip(indices, neurons, strict=True)):
                    sample = x[index : index + 1]
                    activation = Truncated(model, REF_LAYER)(sample)
                    if rf:
                        mask = neuron_mask(activation.shape, c, int(neuron))
                    else:
                        mask = channel_mask(activation.shape, [c])
                    expected = lrp_from_layer(model, MAIN, sample, REF_LAYER, activation * mask).sum(1)
                    assert_close(
                        heatmaps[i : i + 1], expected, f"reference heatmap {mode} rf={rf} c={c} #{i}"
                    )
                prefix = f"{MAIN}/fv_ref/{mode}/{'rf' if rf else 'channel'}/{c}"
                out[f"{prefix}/samples"] = to_numpy(samples)
                out[f"{prefix}/heatmaps"] = to_numpy(heatmaps)
                out[f"{prefix}/sample_index"] = indices.astype(np.int64)
                out[f"{prefix}/neuron"] = neurons.astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    versions = {name: importlib.metadata.version(name) for name in ("torch", "zennit", "zennit-crp")}
    print(", ".join(f"{name} {version}" for name, version in versions.items()))

    params = load_params()
    model = build_model(params)
    x_nhwc, label = make_data()
    x = nchw(x_nhwc)
    with torch.no_grad():
        logits = model(x)
    prediction = logits.argmax(1).numpy()
    print(
        f"labels      {label}\npredictions {prediction}  "
        f"({int((label == prediction).sum())} of {N_DATA} equal)"
    )

    arrays: dict[str, np.ndarray] = dict(params)
    arrays.update(
        {
            "x": x_nhwc,
            "label": label,
            "logits": logits.numpy(),
            "prediction": prediction.astype(np.int64),
            "layers": np.array(LAYERS),
            "cases": np.array(list(CASES)),
            "versions": np.array(json.dumps(versions)),
        }
    )
    attribution = CondAttribution(model)
    report: list[str] = []
    parts = [(plain, (case, x, label, logits.numpy())) for case in CASES]
    parts += [(conditional, (case, x, label)) for case in CASES]
    parts += [(start_layer_all, (x,)), (feature_visualization, (x, label))]
    for part, args in parts:
        result, lines = part(attribution, model, *args)
        arrays.update(result)
        report += lines

    for key, value in arrays.items():
        assert value.dtype.kind in "fiUb", key
        assert (
            value.dtype.kind != "f" or key == "x" or key.startswith("params/") or value.dtype == np.float64
        ), key
        assert value.dtype.kind != "f" or np.isfinite(value).all(), key
    print("\n".join(report))
    GG.save_npz(OUT_PATH, arrays)
    print(f"wrote {OUT_PATH.name}: {len(arrays)} arrays, {OUT_PATH.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
