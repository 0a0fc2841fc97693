"""The model zoo (``jaxdtd.models.classic``), BatchNorm folding and residual sums against zennit.

* Every zoo model initialises (``jax.eval_shape`` of ``model.init``: the whole Flax set-up without
  XLA's random-number kernels, which cost seconds per model on a CPU; ``LeNet`` also runs a real
  ``init``), applies with finite logits, and ``trace_plan`` finds its affine layers with every
  BatchNorm folded into the convolution before it.
* ``explain`` runs EpsilonPlusFlat and DeepTaylor on each architecture (one ``jax.jit`` per model).
* Golden files of ``tests/reference/generate_golden_resnet.py`` (zennit 1.0 with
  ``SequentialMergeBatchNorm`` and ``zennit.layer.Sum``): a CNN with BatchNorm after biased
  convolutions and a tiny ResNet with identity and projection shortcuts.  Pass criterion as in
  ``test_golden.py``: relative L2 error < 1e-4 (float32 vs zennit in float64).
* Conservation: DeepTaylor is exact on sequential ReLU nets; on a residual net it is measured.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_cases import CASE_COMPOSITES as ALL_CASE_COMPOSITES
from models import CNN, params_from_flat

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R
from jaxdtd.models.classic import (
    VGG16,
    BasicBlock,
    InceptionBlock,
    InceptionNet,
    LeNet,
    ResNet,
    ResNet18,
    ResNet50,
)

HERE = pathlib.Path(__file__).parent / "reference"
BN_EPS = 1e-5

# ---------------------------------------------------------------------------------------------------
# The zoo at test sizes
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    model: nn.Module
    shape: tuple[int, ...]  # input, NHWC
    convs: int  # affine layers of kind "conv"
    dense: int
    batch_norm: bool  # every convolution is followed by an inference-mode BatchNorm
    residual: bool = False


ZOO = {
    "LeNet28": Entry(LeNet(num_classes=10), (2, 28, 28, 1), 2, 3, False),
    "LeNet32": Entry(LeNet(num_classes=7), (1, 32, 32, 1), 2, 3, False),
    "VGG16": Entry(VGG16(num_classes=10, width=1 / 16), (2, 32, 32, 3), 13, 3, False),
    "VGG16_bn": Entry(VGG16(num_classes=10, width=1 / 16, batch_norm=True), (2, 32, 32, 3), 13, 3, True),
    "ResNet18": Entry(ResNet18(num_classes=10, width=4), (2, 32, 32, 3), 20, 1, True, True),
    "ResNet50": Entry(ResNet50(num_classes=10, width=4), (2, 32, 32, 3), 53, 1, True, True),
    "InceptionNet": Entry(InceptionNet(num_classes=10, width=1 / 8), (2, 32, 32, 3), 19, 1, False),
    "InceptionNet_bn": Entry(
        InceptionNet(num_classes=10, width=1 / 8, batch_norm=True), (2, 32, 32, 3), 19, 1, True
    ),
    "InceptionNet_bn_factorized": Entry(
        InceptionNet(num_classes=6, width=1 / 8, batch_norm=True, factorized=True),
        (1, 16, 16, 3),
        22,
        1,
        True,
    ),
}
#: one per architecture: each compiles a jit of the forward pass and two relevance passes
EXPLAINED = ("LeNet28", "VGG16_bn", "ResNet18", "ResNet50", "InceptionNet_bn")


def random_variables(model: nn.Module, x: jnp.ndarray, seed: int, bias_free: bool = False) -> dict:
    """Variables of ``model.init``'s structure filled from numpy: kernels N(0, 2/fan_in), biases
    N(0, 0.1^2); BatchNorm mean N(0, 0.3^2), var U[0.5, 2], scale +-U[0.5, 1.5] (a fifth negative),
    shift N(0, 0.1^2).  ``bias_free`` zeroes every bias, BatchNorm mean and shift: then the network
    is a bias-free ReLU network, the setting in which DeepTaylor's conservation is exact."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, shape) * np.where(rng.uniform(size=shape) < 0.2, -1.0, 1.0)
        elif name == "var":
            value = rng.uniform(0.5, 2.0, shape)
        else:  # bias, BatchNorm shift and mean
            value = rng.standard_normal(shape) * (0.3 if name == "mean" else 0.1) * (not bias_free)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def zoo_input(entry: Entry) -> jnp.ndarray:
    return jax.random.uniform(jax.random.PRNGKey(0), entry.shape)  # pixels in [0, 1]


@pytest.mark.parametrize("name", list(ZOO))
def test_init_and_apply(name):
    entry = ZOO[name]
    x = zoo_input(entry)
    shapes = jax.eval_shape(entry.model.init, jax.random.PRNGKey(0), x)
    assert set(shapes) == ({"params", "batch_stats"} if entry.batch_norm else {"params"})
    logits = entry.model.apply(random_variables(entry.model, x, seed=1), x)
    assert logits.shape == (entry.shape[0], entry.model.num_classes)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_lenet_real_init():
    x = jnp.zeros((2, 28, 28, 1))
    variables = LeNet().init(jax.random.PRNGKey(0), x)
    assert variables["params"]["conv1"]["kernel"].shape == (5, 5, 1, 6)
    assert variables["params"]["fc1"]["kernel"].shape == (5 * 5 * 16, 120)
    with pytest.raises(ValueError, match="28x28 or 32x32"):
        LeNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 1)))


def test_training_mode_updates_batch_stats():
    model = ResNet(stage_sizes=(1,), width=2, num_classes=3, stem_kernel=3, stem_stride=1, train=True)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
    variables = random_variables(model, x, seed=0)
    _, updated = model.apply(variables, x, mutable=["batch_stats"])
    before = variables["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(updated["batch_stats"]["stem_bn"]["mean"], before)


@pytest.mark.parametrize("name", list(ZOO))
def test_trace_plan_folds_batch_norm(name):
    entry = ZOO[name]
    x = zoo_input(entry)
    variables = random_variables(entry.model, x, seed=1)
    plan = dtd.trace_plan(entry.model.apply, C.EpsilonPlusFlat(), (variables, x))
    layers = [layer for layer, _, _ in plan.layer_rules]
    kinds = [layer.kind for layer in layers]
    assert (kinds.count("conv"), kinds.count("dense")) == (entry.convs, entry.dense)
    # a convolution followed by BatchNorm has its scale folded into the kernel; nothing else does
    assert [layer.folds_scale for layer in layers] == [entry.batch_norm and k == "conv" for k in kinds]
    assert sum(layer.first for layer in layers) == 1 and layers[0].first
    for layer, rule, _ in plan.layer_rules:
        expected = R.Flat if layer.first else (R.ZPlus if layer.kind == "conv" else R.Epsilon)
        assert isinstance(rule, expected), (layer.module_path, rule)
    if entry.residual:
        shortcuts = [layer for layer in layers if layer.module_path.endswith("shortcut_conv")]
        assert len(shortcuts) == len(entry.model.stage_sizes) - (entry.model.block is BasicBlock)


@functools.cache
def zoo_run(name: str):
    """One jit per model: logits, EpsilonPlusFlat and DeepTaylor relevance, for random weights with
    and without biases (the second call reuses the compiled function)."""
    entry = ZOO[name]
    x = zoo_input(entry)

    @jax.jit
    def run(variables, x):
        r_flat, y = dtd.explain(entry.model.apply, variables, x, composite=C.EpsilonPlusFlat())
        r_taylor, _ = dtd.explain(entry.model.apply, variables, x, composite=C.DeepTaylor())
        return y, r_flat, r_taylor

    results = {}
    for bias_free in (False, True):
        variables = random_variables(entry.model, x, seed=2, bias_free=bias_free)
        y, r_flat, r_taylor = run(variables, x)
        results[bias_free] = dict(
            variables=variables,
            logits=np.asarray(y),
            flat=np.asarray(r_flat, np.float64),
            taylor=np.asarray(r_taylor, np.float64),
        )
    return x, results


def conservation(relevance: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """sum R / f_c(x) per sample, c the arg-max class (explain's default target)."""
    return relevance.reshape(len(logits), -1).sum(-1) / logits.max(-1)


@pytest.mark.parametrize("name", EXPLAINED)
def test_explain_runs_on_zoo(name):
    entry = ZOO[name]
    x, results = zoo_run(name)
    for run in results.values():
        expected = entry.model.apply(run["variables"], x)
        np.testing.assert_allclose(run["logits"], np.asarray(expected), rtol=2e-5, atol=1e-6)
        for key in ("flat", "taylor"):
            assert run[key].shape == x.shape and np.all(np.isfinite(run[key])), key
            assert np.abs(run[key]).max() > 0, key
    if not entry.residual:
        # sequential ReLU net without biases: DeepTaylor is conservative and positive (the paper's
        # "consistent"; the top logit is positive here, checked)
        free = results[True]
        assert np.all(free["logits"].max(-1) > 0)
        np.testing.assert_allclose(conservation(free["taylor"], free["logits"]), 1.0, atol=1e-3)
        assert free["taylor"].min() >= -1e-6 * np.abs(free["taylor"]).max()


@pytest.mark.parametrize("name", ["ResNet18", "ResNet50"])
def test_resnet_deep_taylor_conservation_is_measured(name):
    """On a bias-free ResNet, DeepTaylor is *not* conservative: the residual sum (Norm) hands each branch
    a share proportional to its value, and a branch value below 0 without positive contributions
    (z+ = 0) cannot pass its negative share on through ZPlus.  Dropping a negative share *adds*
    relevance, so the input relevance tends to exceed f_c(x) (measured here, width 4, 32x32:
    ResNet18 +5%, ResNet50 +14%).  With biases (which DeepTaylor drops) the ratio wanders further.
    Bounded loosely, and printed (``pytest -s``)."""
    _, results = zoo_run(name)
    free = results[True]
    ratio = conservation(free["taylor"], free["logits"])
    with_bias = conservation(results[False]["taylor"], results[False]["logits"])
    print(f"{name} DeepTaylor sum R / f_c(x): bias-free {ratio}, with biases {with_bias}")
    assert np.all(free["logits"].max(-1) > 0)
    assert np.all(np.abs(ratio - 1) < 0.3), ratio
    assert np.all(np.abs(with_bias - 1) < 0.5), with_bias


# ---------------------------------------------------------------------------------------------------
# zennit golden files for BatchNorm and residual sums
# ---------------------------------------------------------------------------------------------------


class BNCNN(nn.Module):
    """tests/models.py's CNN with an inference-mode BatchNorm after each (biased) convolution:
    Conv_0 -> BatchNorm_0 -> ReLU -> maxpool 2 -> Conv_1 -> BatchNorm_1 -> ReLU -> avgpool 2 -> flatten
    -> Dense_0 -> ReLU -> Dense_1.  Input (N, 8, 8, 3)."""

    @nn.compact
    def __call__(self, x):
        bn = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=BN_EPS)
        x = nn.Conv(4, (3, 3), padding="SAME", name="Conv_0")(x)
        x = nn.max_pool(nn.relu(bn(name="BatchNorm_0")(x)), (2, 2), strides=(2, 2))
        x = nn.Conv(6, (3, 3), padding="SAME", name="Conv_1")(x)
        x = nn.avg_pool(nn.relu(bn(name="BatchNorm_1")(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(10, name="Dense_0")(x))
        return nn.Dense(5, name="Dense_1")(x)


#: the generator's TinyResNetTwin: stem 3x3 + BN + ReLU + maxpool, an identity block, a stride-2 block
#: with a 1x1 projection, global average pool, head
TINY_RESNET = ResNet(stage_sizes=(1, 1), num_classes=5, width=4, stem_kernel=3, stem_stride=1)
GOLDEN_MODELS = {"bn_cnn": BNCNN(), "resnet": TINY_RESNET}
GOLDEN_CASES = ("epsilon", "zplus", "gamma_0.25", "EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1",
                "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox", "DeepTaylor", "DeepTaylorBox")  # fmt: skip
CASE_COMPOSITES = {case: ALL_CASE_COMPOSITES[case] for case in GOLDEN_CASES}


@functools.cache
def load(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(HERE / f"golden_{name}.npz", allow_pickle=False))


def golden_variables(golden: dict[str, np.ndarray]) -> dict:
    return params_from_flat({k: v for k, v in golden.items() if k.startswith(("params/", "batch_stats/"))})


def relative_l2(actual, expected) -> float:
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


GOLDEN_CASES = [(m, str(c)) for m in GOLDEN_MODELS for c in load(m)["cases"]]


def test_golden_cases_cover_presets_and_rules():
    for model in GOLDEN_MODELS:
        assert set(load(model)["cases"].tolist()) == set(CASE_COMPOSITES)


@pytest.mark.parametrize("model_name", list(GOLDEN_MODELS))
def test_golden_forward_matches_torch(model_name):
    golden = load(model_name)
    logits = GOLDEN_MODELS[model_name].apply(golden_variables(golden), jnp.asarray(golden["x"]))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model_name", "case"), GOLDEN_CASES, ids=[f"{m}-{c}" for m, c in GOLDEN_CASES])
def test_golden_relevance_matches_zennit(model_name, case):
    golden = load(model_name)
    relevance, _ = dtd.explain(
        GOLDEN_MODELS[model_name].apply,
        golden_variables(golden),
        jnp.asarray(golden["x"]),
        target=jnp.asarray(golden["target"]),
        composite=CASE_COMPOSITES[case],
    )
    error = relative_l2(relevance, golden[f"relevance/{case}"])
    assert error < 1e-4, f"{model_name}/{case}: relative L2 error {error:.2e}"


def folded_by_hand(golden: dict[str, np.ndarray]) -> dict:
    """The BN CNN's variables with each BatchNorm folded into its convolution (rules.md):
    ``s = scale / sqrt(var + eps)``, ``W' = W * s``, ``b' = (b - mean) * s + shift``."""
    flat = {}
    for name in ("Dense_0", "Dense_1"):
        for leaf in ("kernel", "bias"):
            flat[f"params/{name}/{leaf}"] = golden[f"params/{name}/{leaf}"]
    for i in range(2):
        conv, bn = f"Conv_{i}", f"BatchNorm_{i}"
        s = golden[f"params/{bn}/scale"].astype(np.float64) / np.sqrt(
            golden[f"batch_stats/{bn}/var"].astype(np.float64) + BN_EPS
        )
        flat[f"params/{conv}/kernel"] = (golden[f"params/{conv}/kernel"] * s).astype(np.float32)
        shifted = golden[f"params/{conv}/bias"] - golden[f"batch_stats/{bn}/mean"]
        flat[f"params/{conv}/bias"] = (shifted * s + golden[f"params/{bn}/bias"]).astype(np.float32)
    return params_from_flat(flat)


@pytest.mark.parametrize("case", list(CASE_COMPOSITES))
def test_batch_norm_equals_folding_by_hand(case):
    """The BN CNN explains exactly like the plain CNN (tests/models.py) with BatchNorm folded by hand,
    so the modified weights (w+, w^2, ...) act on the folded kernel, and the folded bias keeps the
    convolution's own bias."""
    golden = load("bn_cnn")
    x, target = jnp.asarray(golden["x"]), jnp.asarray(golden["target"])
    comp = CASE_COMPOSITES[case]
    with_bn, y_bn = dtd.explain(BNCNN().apply, golden_variables(golden), x, target=target, composite=comp)
    by_hand, y_plain = dtd.explain(CNN().apply, folded_by_hand(golden), x, target=target, composite=comp)
    np.testing.assert_allclose(np.asarray(y_plain), np.asarray(y_bn), rtol=1e-5, atol=1e-6)
    assert relative_l2(with_bn, np.asarray(by_hand, np.float64)) < 1e-5


def test_golden_bn_cnn_deep_taylor_is_conservative():
    golden = load("bn_cnn")
    x, target = jnp.asarray(golden["x"]), jnp.asarray(golden["target"])
    for case in ("DeepTaylor", "DeepTaylorBox"):
        relevance, y = dtd.explain(
            BNCNN().apply, golden_variables(golden), x, target=target, composite=CASE_COMPOSITES[case]
        )
        ratio = (
            np.asarray(relevance, np.float64).reshape(len(target), -1).sum(-1)
            / np.asarray(y)[np.arange(len(target)), golden["target"]]
        )
        np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


def test_golden_resnet_bias_free_deep_taylor():
    """The tiny ResNet with every BatchNorm mean and shift and the head bias at 0, against zennit's
    stored relevance.  Its non-conservation is measured and equals zennit's: sample 0 gains about 5%
    (a negative branch value without positive contributions at a residual sum), sample 1 none."""
    golden = load("resnet")
    flat = {}
    for key, value in golden.items():
        if key.startswith(("params/", "batch_stats/")):
            zero = key.endswith("/mean") or (key.startswith("params/") and key.endswith("/bias"))
            flat[key] = np.zeros_like(value) if zero else value
    x, target = jnp.asarray(golden["x"]), jnp.asarray(golden["target"])
    relevance, y = dtd.explain(
        TINY_RESNET.apply, params_from_flat(flat), x, target=target, composite=C.DeepTaylor()
    )
    np.testing.assert_allclose(np.asarray(y), golden["logits_biasfree"], rtol=1e-5, atol=1e-5)
    expected = golden["relevance_biasfree/DeepTaylor"]
    assert relative_l2(relevance, expected) < 1e-4
    f_c = golden["logits_biasfree"][np.arange(len(target)), golden["target"]]
    ratio = np.asarray(relevance, np.float64).reshape(len(target), -1).sum(-1) / f_c
    zennit_ratio = expected.reshape(len(target), -1).sum(-1) / f_c
    print(f"tiny ResNet bias-free DeepTaylor sum R / f_c(x): jaxdtd {ratio}, zennit {zennit_ratio}")
    np.testing.assert_allclose(ratio, zennit_ratio, atol=1e-5)
    assert 0.01 < ratio[0] - 1 < 0.3 and abs(ratio[1] - 1) < 1e-4, ratio


def test_inception_block_concatenates_branches():
    block = InceptionBlock(c1=2, c3_reduce=3, c3=4, c5_reduce=2, c5=3, pool_proj=1)
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 6, 6, 5))
    variables = random_variables(block, x, seed=3)
    y = block.apply(variables, x)
    assert y.shape == (1, 6, 6, 2 + 4 + 3 + 1)
    plan = dtd.trace_plan(block.apply, C.EpsilonPlus(), (variables, x))
    assert len(plan.layer_rules) == 6
