"""The transformer rules (AttnLRP, CP-LRP) against independent references.

* exact fractions for the uniform rule on products (``a * b``, ``Q K^T``) and the identity rule on
  elementwise islands (GELU, SiLU, ...);
* the explicit formulas of AttnLRP for softmax (``R_x = x (R_A - A sum R_A)``, both traced forms and a
  hand-written one, masked entries exactly 0) and LayerNorm with sigma constant
  (``u_k = (w_k / sigma) R_k / y_k``, ``R_x,i = x_i (u_i - mean_k u_k)``), in float64 numpy;
* a whole attention block against LXT's own construction, independent of jaxdtd's engine: the
  gradient (float64, plain JAX) of the block with every product's gradient halved, LayerNorm's sigma
  detached and every nonlinearity's gradient replaced by ``f(u) / u``, times the input.
"""

from __future__ import annotations

from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import rules as R
from jaxdtd.units import Bind, IslandUnit

MIN = float(jnp.finfo(jnp.float32).min)


def _relevance(fn, x, composite, cotangent=None):
    f = dtd.transform(lambda _, x: fn(x), composite)
    ct = jnp.ones_like(fn(x)) if cotangent is None else cotangent
    return np.asarray(jax.grad(lambda x: (f(None, x) * ct).sum())(x))


# --- exact fractions ----------------------------------------------------------------------------
@pytest.mark.parametrize("composite", [C.AttnLRP(), C.Composite(operations={"mul": R.Uniform(0.0)})])
def test_elementwise_product_of_two_data_values_splits_in_half(composite):
    x = jnp.array([[3.0, 5.0], [-2.0, 7.0]])
    relevance = _relevance(lambda x: x[:, :1] * x[:, 1:], x, composite)
    # R_y = y (initial relevance), each factor gets y / 2: 15/2 and -14/2
    np.testing.assert_array_equal(relevance, [[7.5, 7.5], [-7.0, -7.0]])


def test_every_composite_gives_products_the_uniform_rule_with_its_stabilizer():
    x = jnp.array([[3.0, 5.0], [-2.0, 7.0]])
    relevance = _relevance(lambda x: x[:, :1] * x[:, 1:], x, C.EpsilonPlus())
    y = np.array([15.0, -14.0])
    share = y / 2 * y / (y + 1e-6 * np.sign(y))  # R_y y / stab(y), halved
    np.testing.assert_allclose(relevance, np.stack([share, share], 1), rtol=1e-6)


def test_matrix_product_of_two_data_values_is_the_uniform_rule():
    """``S = Q K^T``, ``R_S = S`` (cotangent 1): ``R_Q,ad = 1/2 sum_b Q_ad K_bd`` and
    ``R_K,bd = 1/2 sum_a Q_ad K_bd``, as fractions."""
    q = [[1, 2], [3, -1]]
    k = [[2, 1], [-1, 4], [1, 1]]
    x = jnp.array([sum(q, []) + sum(k, [])], dtype=jnp.float32)

    def scores(x):
        return jnp.einsum("ad,bd->ab", x[0, :4].reshape(2, 2), x[0, 4:].reshape(3, 2))

    relevance = _relevance(scores, x, C.AttnLRP())[0]
    half = Fraction(1, 2)
    r_q = [[half * q[a][d] * sum(k[b][d] for b in range(3)) for d in range(2)] for a in range(2)]
    r_k = [[half * k[b][d] * sum(q[a][d] for a in range(2)) for d in range(2)] for b in range(3)]
    expected = [float(v) for row in r_q + r_k for v in row]
    np.testing.assert_array_equal(relevance, np.asarray(expected, np.float32))


@pytest.mark.parametrize(
    "act",
    [
        lambda u: jax.nn.gelu(u, approximate=False),
        lambda u: jax.nn.gelu(u, approximate=True),
        jax.nn.silu,
        jax.nn.softplus,
        jax.nn.elu,
        jnp.tanh,
    ],
    ids=["gelu_erf", "gelu_tanh", "silu", "softplus", "elu", "tanh"],
)
def test_elementwise_nonlinearity_gets_the_identity_rule(act):
    x = jnp.array([[1.0, -2.0, 0.5, 3.0]])
    np.testing.assert_array_equal(_relevance(act, x, C.AttnLRP()), act(x))


# --- softmax ----------------------------------------------------------------------------------------
def _softmax_reference(x, cotangent, mask=None):
    x = np.asarray(x, np.float64)
    z = x if mask is None else x + mask
    a = np.exp(z - z.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    r_a = a * np.asarray(cotangent)
    return x * (r_a - a * r_a.sum(-1, keepdims=True))


def _hand_softmax(x):
    e = jnp.exp(x)
    return e / e.sum(-1, keepdims=True)


def _hand_softmax_max_not_detached(x):
    e = jnp.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


SOFTMAX_FORMS = {
    "jax.nn.softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "flax.linen.softmax": lambda x: nn.softmax(x, axis=-1),
    "hand-written": _hand_softmax,
    "hand-written, exp twice": lambda x: jnp.exp(x) / jnp.exp(x).sum(-1, keepdims=True),
    "hand-written, max not detached": _hand_softmax_max_not_detached,
}


@pytest.mark.parametrize("form", SOFTMAX_FORMS)
@pytest.mark.parametrize("custom_jvp", [False, True], ids=["inlined", "custom_jvp"])
def test_softmax_rule(form, custom_jvp):
    x = jnp.array([[1.0, 2.0, -0.5, 3.0], [0.0, -1.0, 2.0, 0.5]])
    ct = jnp.array([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 2.0]])
    with jax.softmax_custom_jvp(custom_jvp):
        fn = SOFTMAX_FORMS[form]
        the_plan = dtd.trace_plan(lambda _, x: fn(x), C.AttnLRP(), (None, x))
        relevance = _relevance(fn, x, C.AttnLRP(), ct)
    assert [u.kind for u in the_plan.unfused_units() if isinstance(u, IslandUnit)] == ["softmax"]
    np.testing.assert_allclose(relevance, _softmax_reference(x, ct), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", ["finfo.min added", "-inf added", "where -inf"])
def test_masked_softmax_entries_get_exactly_zero_and_no_nan(form):
    x = jnp.array([[1.0, 2.0, -0.5, 3.0]])
    fill = MIN if form == "finfo.min added" else -jnp.inf
    mask = jnp.array([[0.0, 0.0, fill, 0.0]])
    ct = jnp.array([[0.0, 1.0, 1.0, 0.0]])
    if form == "where -inf":
        keep = jnp.array([[True, True, False, True]])
        relevance = _relevance(lambda x: jax.nn.softmax(jnp.where(keep, x, -jnp.inf)), x, C.AttnLRP(), ct)
    else:
        relevance = _relevance(lambda x: jax.nn.softmax(x + mask), x, C.AttnLRP(), ct)
    assert relevance[0, 2] == 0.0 and np.isfinite(relevance).all()
    # the mask addend absorbs nothing elsewhere: R_x = x (R_A - A sum R_A) on the kept entries
    kept = _softmax_reference(x, ct, np.asarray(mask))
    np.testing.assert_allclose(relevance[0, [0, 1, 3]], kept[0, [0, 1, 3]], rtol=1e-5)


def test_cplrp_cuts_the_softmax_and_cplrp_is_not_attnlrp():
    x = jnp.array([[1.0, 2.0, -0.5, 3.0]])
    v = jnp.array([[0.5, -1.0], [2.0, 1.0], [1.0, 1.0], [-1.0, 3.0]])
    fn = lambda x: jax.nn.softmax(x) @ v + x[:, :2]
    the_plan = dtd.trace_plan(lambda _, x: fn(x), C.CPLRP(), (None, x))
    assert not [u for u in the_plan.unfused_units() if isinstance(u, IslandUnit)]  # the softmax is a constant
    relevance = _relevance(fn, x, C.CPLRP())
    # only the residual x[:, :2] carries relevance: LRP-0 on y = A v + x_head, R_x_head = x_head R/y
    y = np.asarray(fn(x), np.float64)
    np.testing.assert_allclose(relevance[0, :2], np.asarray(x)[0, :2] * y[0] / y[0], rtol=1e-6)
    np.testing.assert_array_equal(relevance[0, 2:], 0.0)


# --- LayerNorm and friends ----------------------------------------------------------------------------
SCALE = np.array([1.0, 2.0, 0.5, 1.5])
BIAS = np.array([0.1, -0.2, 0.3, 0.0])


def _layernorm_reference(x, cotangent, scale=SCALE, bias=BIAS, eps=1e-6, center=True):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True) if center else 0.0
    sigma = (
        np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
        if center
        else np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    )
    y = scale * (x - mu) / sigma + bias
    u = (scale / sigma) * (y * np.asarray(cotangent)) / y
    return x * (u - u.mean(-1, keepdims=True)) if center else x * u


def _hand_layernorm(x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * SCALE + BIAS


def _std_layernorm(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-6) * SCALE + BIAS


LAYERNORMS = {
    "flax.linen.LayerNorm": lambda x: nn.LayerNorm(epsilon=1e-6).apply(
        {"params": {"scale": jnp.asarray(SCALE), "bias": jnp.asarray(BIAS)}}, x
    ),
    "mean/var/rsqrt": _hand_layernorm,
    "jnp.var + sqrt": _std_layernorm,
}


@pytest.mark.parametrize("form", LAYERNORMS)
def test_layernorm_sigma_constant_centering_kept(form):
    x = jnp.array([[1.0, 2.0, -0.5, 3.0], [0.3, -1.0, 2.0, 0.5]])
    ct = jnp.array([[0.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, -1.0]])
    relevance = _relevance(LAYERNORMS[form], x, C.AttnLRP(), ct)
    np.testing.assert_allclose(relevance, _layernorm_reference(x, ct), rtol=2e-5, atol=1e-6)


def test_rmsnorm_passes_relevance_unchanged():
    x = jnp.array([[1.0, 2.0, -0.5, 3.0]])
    scale = jnp.array([1.0, 2.0, 0.5, 1.5])
    fn = lambda x: nn.RMSNorm(epsilon=1e-6).apply({"params": {"scale": scale}}, x)
    np.testing.assert_allclose(_relevance(fn, x, C.AttnLRP()), fn(x), rtol=1e-6)


def test_layer_norm_statistic_is_a_cut_in_every_composite_but_batch_statistics_are_not():
    x = jnp.ones((2, 3, 4))
    the_plan = dtd.trace_plan(lambda _, x: LAYERNORMS["flax.linen.LayerNorm"](x), R.Epsilon(), (None, x))
    assert [u.equation.name for u in the_plan.units if isinstance(u, Bind) and u.cut] == ["rsqrt"]
    described = dtd.describe(
        lambda _, x: LAYERNORMS["flax.linen.LayerNorm"](x), None, x, composite=R.Epsilon()
    )
    assert ("cut rsqrt", "constant", 1) in described.operations
    batch_norm = lambda _, x: (x - x.mean(0)) * jax.lax.rsqrt(x.var(0) + 1e-5)
    with pytest.raises(dtd.UnsupportedOperationError, match="normalization statistic over the batch axis"):
        dtd.trace_plan(batch_norm, R.Epsilon(), (None, x))


# --- a whole attention block against LXT's construction -----------------------------------------------
class Block(nn.Module):
    """A pre-norm transformer block: LayerNorm, two-head self-attention with a padding mask,
    residual, LayerNorm, GELU MLP, residual."""

    heads: int = 2

    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        h = nn.LayerNorm(name="ln_1")(x)
        q, k, v = (nn.Dense(d, name=n)(h).reshape(b, t, self.heads, -1) for n in ("q", "k", "v"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
        scores = scores + (1.0 - mask[:, None, None, :]) * MIN
        attention = jax.nn.softmax(scores, axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(b, t, d)
        x = x + nn.Dense(d, name="o")(mixed)
        h = nn.LayerNorm(name="ln_2")(x)
        return x + nn.Dense(d, name="down")(jax.nn.gelu(nn.Dense(2 * d, name="up")(h), approximate=False))


def _lxt_style_block(params, x, mask, heads, cp):
    """The same block, written as LXT's efficient mode rewrites it: its gradient times the input is
    AttnLRP (or CP-LRP).  Plain JAX, no jaxdtd."""
    sg = jax.lax.stop_gradient

    def half_product(a, b, spec):  # the product's value, half its gradient to each factor
        out = jnp.einsum(spec, a, b)
        return 0.5 * out + 0.5 * sg(out)

    def layernorm(p, x):
        mu = x.mean(-1, keepdims=True)
        sigma = jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
        return (x - mu) / sg(sigma) * p["scale"] + p["bias"]

    def dense(p, x):
        return x @ p["kernel"] + p["bias"]

    def identity_gelu(u):  # backward g * gelu(u) / u
        return u * sg(jax.nn.gelu(u, approximate=False) / u)

    b, t, d = x.shape
    h = layernorm(params["ln_1"], x)
    q, k, v = (dense(params[n], h).reshape(b, t, heads, -1) for n in ("q", "k", "v"))
    if cp:
        q, k = sg(q), sg(k)
    scores = half_product(q, k, "bqhd,bkhd->bhqk") / np.sqrt(d // heads)
    attention = jax.nn.softmax(scores + (1.0 - mask[:, None, None, :]) * np.finfo(np.float64).min, axis=-1)
    if cp:
        mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, v)
    else:
        mixed = half_product(attention, v, "bhqk,bkhd->bqhd")
    x = x + dense(params["o"], mixed.reshape(b, t, d))
    h = layernorm(params["ln_2"], x)
    return x + dense(params["down"], identity_gelu(dense(params["up"], h)))


@pytest.mark.parametrize("composite", ["AttnLRP", "CPLRP"])
def test_attention_block_matches_lxt_construction(composite):
    block = Block()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.float32)
    variables = block.init(jax.random.PRNGKey(1), x, mask)
    variables = jax.tree_util.tree_map(  # non-trivial LayerNorm scales and biases
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), variables
    )
    readout = jax.random.normal(jax.random.PRNGKey(3), (8,))
    f = dtd.transform(block.apply, getattr(C, composite)())
    relevance = jax.grad(lambda x: (f(variables, x, mask) @ readout).sum())(x)

    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), variables["params"])
        x64, mask64 = jnp.asarray(x, jnp.float64), jnp.asarray(mask, jnp.float64)
        score = lambda x: (_lxt_style_block(params64, x, mask64, 2, composite == "CPLRP") @ readout).sum()
        expected = np.asarray(x64 * jax.grad(score)(x64))
        np.testing.assert_allclose(
            _lxt_style_block(params64, x64, mask64, 2, False), block.apply(variables, x, mask), rtol=1e-4
        )
    error = np.linalg.norm(np.asarray(relevance) - expected) / np.linalg.norm(expected)
    assert error < 1e-5, error


def test_detached_attention_is_an_operation_not_a_dense_layer():
    """With ``A`` detached, ``A @ v`` has one data operand; its "kernel" is computed from the input,
    so it is not an affine layer (no dense-layer rule such as z+): LRP-epsilon on ``v -> A v``."""

    def fn(w, x):
        attention = jax.lax.stop_gradient(jax.nn.softmax(x @ x.transpose(0, 2, 1)))
        return (attention @ x) @ w

    w, x = jnp.ones((3, 2)), jax.random.normal(jax.random.PRNGKey(0), (1, 4, 3))
    the_plan = dtd.trace_plan(fn, C.DeepTaylor(), (w, x), argnums=1)
    assert [layer.linear.in_avals[1].shape for layer, _, _ in the_plan.layer_rules] == [(3, 2)]  # only w
    operations = [(eqn.name, type(rule).__name__) for eqn, rule, _ in the_plan.operations]
    assert ("dot_general", "Norm") in operations


def test_cnn_preset_on_a_transformer_does_what_is_documented():
    """EpsilonPlus on an attention block: its dense layers get the dense rule (Epsilon), the products
    of data values the uniform rule, the softmax its unit, LayerNorm's sigma is a cut; no attention
    matrix is taken for a kernel."""
    block = Block()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    mask = jnp.ones((2, 5))
    variables = block.init(jax.random.PRNGKey(1), x, mask)
    the_plan = dtd.trace_plan(block.apply, C.EpsilonPlus(), (variables, x, mask))
    assert sorted(layer.param_path for layer, _, _ in the_plan.layer_rules) == sorted(
        f"params/{n}/kernel" for n in ("q", "k", "v", "o", "up", "down")
    )
    assert {type(rule).__name__ for _, rule, _ in the_plan.layer_rules} == {"Epsilon"}
    products = [type(rule).__name__ for eqn, rule, _ in the_plan.operations if eqn.name == "dot_general"]
    assert products == ["Uniform", "Uniform"]
    assert [u.kind for u in the_plan.unfused_units() if isinstance(u, IslandUnit)].count("softmax") == 1
    assert [u.equation.name for u in the_plan.units if isinstance(u, Bind) and u.cut] == ["rsqrt", "rsqrt"]
    relevance = jax.grad(lambda x: dtd.transform(block.apply, C.EpsilonPlus())(variables, x, mask).sum())(x)
    assert np.isfinite(np.asarray(relevance)).all()


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_layernorm_of_other_frameworks_is_recognised(framework):
    x = jnp.array([[1.0, 2.0, -0.5, 3.0], [0.3, -1.0, 2.0, 0.5]])
    ct = jnp.array([[0.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, -1.0]])
    if framework == "nnx":
        from flax import nnx

        norm = nnx.LayerNorm(4, epsilon=1e-6, rngs=nnx.Rngs(0))
        norm.scale.value, norm.bias.value = jnp.asarray(SCALE, jnp.float32), jnp.asarray(BIAS, jnp.float32)
        fn = norm
    else:
        eqx = pytest.importorskip("equinox")
        norm = eqx.nn.LayerNorm(4, eps=1e-6)
        norm = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            norm,
            (jnp.asarray(SCALE, jnp.float32), jnp.asarray(BIAS, jnp.float32)),
        )
        fn = jax.vmap(norm)
    relevance = _relevance(fn, x, C.AttnLRP(), ct)
    np.testing.assert_allclose(relevance, _layernorm_reference(x, ct), rtol=2e-5, atol=1e-6)


def test_attnlrp_combines_with_cnn_rules_through_selector_maps():
    """LXT's ViT mix: z^B on the patch embedding, gamma on every other layer, AttnLRP for the rest
    (entries in front of AttnLRP's win; AttnLRP's softmax and product rules still apply)."""
    from jaxdtd import selectors as S
    from jaxdtd.models.vit import ViT, ViTConfig

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_layers=1, num_heads=2,
        intermediate_size=16, num_labels=3, layer_norm_eps=1e-6,
    )  # fmt: skip
    model, x = ViT(config), jnp.ones((1, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    mix = C.Composite(
        rules=[(S.First(), R.ZBox(0.0, 1.0)), (S.UnitKind("layer"), R.Gamma(0.25)), *C.AttnLRP().rules]
    )
    the_plan = dtd.trace_plan(model.apply, mix, (variables, x))
    rules = [(layer.kind, type(rule).__name__) for layer, rule, _ in the_plan.layer_rules]
    assert rules[0] == ("conv", "ZBox") and {r for _, r in rules[1:]} == {"Gamma"}
    products = [type(rule).__name__ for eqn, rule, _ in the_plan.operations if eqn.name == "dot_general"]
    assert products == ["Uniform", "Uniform"]
    units = the_plan.unfused_units()
    assert [u.rule for u in units if isinstance(u, IslandUnit) and u.kind == "softmax"] == [R.Norm(0.0)]


def test_cplrp_holds_the_swiglu_gate_constant():
    """CP-LRP on ``down(silu(gate x) * up x)``: the activated gate is a constant (LXT's Llama CP-LRP),
    so it equals AttnLRP on the same block with the gate detached by hand; AttnLRP splits the
    product in half instead."""

    def swiglu(p, x, detach=False):
        gate = jax.nn.silu(x @ p["gate"])
        gate = jax.lax.stop_gradient(gate) if detach else gate
        return (gate * (x @ p["up"])) @ p["down"]

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {"gate": jax.random.normal(keys[0], (4, 6)), "up": jax.random.normal(keys[1], (4, 6))}
    p["down"] = jax.random.normal(keys[2], (6, 3))
    x = jax.random.normal(keys[3], (2, 4))

    def relevance(fn, composite):
        f = dtd.transform(fn, composite)
        return np.asarray(jax.grad(lambda x: f(p, x).sum())(x))

    cp = relevance(swiglu, C.CPLRP())
    by_hand = relevance(lambda p, x: swiglu(p, x, detach=True), C.AttnLRP())
    np.testing.assert_allclose(cp, by_hand, rtol=1e-6, atol=1e-7)
    attn = relevance(swiglu, C.AttnLRP())
    assert np.linalg.norm(attn - cp) > 0.1 * np.linalg.norm(cp)
    assert [u.cut for u in dtd.trace_plan(swiglu, C.CPLRP(), (p, x)).units if isinstance(u, Bind)].count(
        True
    ) == 1
