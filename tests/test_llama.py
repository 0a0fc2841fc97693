"""The Flax Llama twin of HuggingFace's ``LlamaForCausalLM`` (``jaxdtd.models.llama``).

* Forward and relevance parity with ``tests/reference/lxt_llama.npz`` (``generate_golden_lxt.py``: torch,
  transformers 4.52.4, eager attention, float32, LXT 2.1): a tiny random ``LlamaForCausalLM`` (untied, GQA
  4 query / 2 key-value heads, head_dim 8), ``E = embed_tokens[ids]`` passed as ``inputs_embeds``, score
  ``logits[b, -1, target_b]``.  Forward: ``max|ours - torch| / max|torch| < 1e-5``; relevance (plain
  gradient x input, AttnLRP, CP-LRP): relative L2 < 1e-4 (measured 5e-7 to 9e-7).  Without the golden
  file these tests skip.
* Loaders: HF names written out here from transformers' module layout (independent of the loader),
  transposes, the tied head, prefixes, ignored buffers, errors naming the keys.
* Structure on random weights: causality, left padding (same logits and relevance as the unpadded
  sequence, no NaN on fully masked rows), jit == eager, init == the HF parameter tree, configs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_transformer_models import flat_params, golden, random_state, rel, state_of

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd.models import llama
from jaxdtd.models.llama import Llama, LlamaConfig

TOLERANCE = 1e-5  # forward, max|ours - torch| / max|torch|
RELEVANCE_TOLERANCE = 1e-4  # relevance, relative L2

LLAMA_TINY = LlamaConfig(
    vocab_size=40,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=16,
    rms_norm_eps=1e-6,
)
#: the HF config.json entries of the golden model (generate_golden_lxt.py's transformers.LlamaConfig)
HF_TINY = {
    "model_type": "llama",
    "vocab_size": 40,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 16,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": 8,
    "pretraining_tp": 1,
}
TIED = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4,
                   num_kv_heads=1, tie_word_embeddings=True, rope_theta=500.0)  # fmt: skip


def relative_l2(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def hf_llama_shapes(cfg: LlamaConfig, tied_head: bool = False) -> dict[str, tuple[int, ...]]:
    """``LlamaForCausalLM.state_dict()`` names and shapes (torch ``Linear``: ``(out, in)``); the tied
    ``lm_head.weight`` only with ``tied_head`` (``state_dict()`` lists it, safetensors files do not)."""
    D, F, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}."
        for linear, (out, inp) in {
            "self_attn.q_proj": (cfg.num_heads * d, D),
            "self_attn.k_proj": (cfg.num_kv_heads * d, D),
            "self_attn.v_proj": (cfg.num_kv_heads * d, D),
            "self_attn.o_proj": (D, cfg.num_heads * d),
            "mlp.gate_proj": (F, D),
            "mlp.up_proj": (F, D),
            "mlp.down_proj": (D, F),
        }.items():
            shapes[f"{layer}{linear}.weight"] = (out, inp)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{layer}{norm}.weight"] = (D,)
    if not cfg.tie_word_embeddings or tied_head:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    return shapes


def hf_random_state(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    state = random_state(hf_llama_shapes(cfg), seed)
    for key in state:  # RMSNorm weights around 1, as trained ones
        if key.endswith("norm.weight"):
            state[key] = (1.0 + state[key] / 2).astype(np.float32)
    return state


# ---------------------------------------------------------------------------------------------------
# Parity with the torch / LXT golden file
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case():
    g = golden("lxt_llama.npz")
    model = Llama(LLAMA_TINY)
    variables = llama.from_huggingface(state_of(g), LLAMA_TINY)
    target = jnp.asarray(g["target"])

    def score(v, e):
        logits = model.apply(v, e, method=Llama.from_embeddings)
        return logits[jnp.arange(logits.shape[0]), -1, target]

    return model, variables, g, score


def test_golden_config_is_the_hf_config():
    assert LlamaConfig.from_huggingface(HF_TINY) == LLAMA_TINY
    assert LLAMA_TINY.head_dim == 8 and LLAMA_TINY.num_kv_groups == 2


def test_embed_and_logits_match_hf(case):
    model, variables, g, score = case
    assert rel(model.apply(variables, g["ids"], method=Llama.embed), g["E"]) < TOLERANCE
    assert rel(model.apply(variables, g["E"], method=Llama.from_embeddings), g["logits"]) < TOLERANCE
    assert rel(model.apply(variables, g["ids"]), g["logits"]) < TOLERANCE
    assert rel(score(variables, jnp.asarray(g["E"])), g["score"]) < TOLERANCE


def test_gradient_times_input_matches_torch(case):
    _, variables, g, score = case
    E = jnp.asarray(g["E"])
    relevance = E * jax.grad(lambda e: score(variables, e).sum())(E)
    error = relative_l2(relevance, g["R_gradient"])
    assert error < RELEVANCE_TOLERANCE, error


def _relevance(score, variables, E, composite):
    f = dtd.transform(score, composite)
    np.testing.assert_allclose(f(variables, E), score(variables, E), rtol=1e-5, atol=1e-6)
    return jax.grad(lambda e: f(variables, e).sum())(E)


def test_attnlrp_matches_lxt(case):
    _, variables, g, score = case
    relevance = _relevance(score, variables, jnp.asarray(g["E"]), C.AttnLRP())
    error = relative_l2(relevance, g["R_attnlrp"])
    assert error < RELEVANCE_TOLERANCE, error  # measured 4.9e-7
    np.testing.assert_allclose(relevance.sum((1, 2)) / g["score"], [0.6214, 0.5787], atol=1e-4)


def test_cplrp_matches_lxt(case):
    """LXT's Llama CP-LRP detaches q and k (softmax constant) and the SwiGLU gate ``silu(gate_proj(x))``:
    with no biases the relevance is conserved (sum R = score)."""
    _, variables, g, score = case
    relevance = _relevance(score, variables, jnp.asarray(g["E"]), C.CPLRP())
    error = relative_l2(relevance, g["R_cplrp"])
    assert error < RELEVANCE_TOLERANCE, error  # measured 4.9e-7
    np.testing.assert_allclose(relevance.sum((1, 2)), g["score"], rtol=1e-5)


def test_cplrp_gate_cut_is_what_lxt_does(case):
    """Holding only the softmax constant (no gate cut) is not LXT's Llama CP-LRP: the gate matters here."""
    _, variables, g, score = case
    softmax_only = C.Composite(rules=C.AttnLRP().rules, cuts=("*:softmax",), name="softmax only")
    relevance = _relevance(score, variables, jnp.asarray(g["E"]), softmax_only)
    assert relative_l2(relevance, g["R_cplrp"]) > 1e-2


def test_relevance_seeded_at_the_embedding_lookup(case):
    """Token ids in, relevance at the output of the ``embed_tokens`` gather: LXT's relevance at
    ``inputs_embeds``."""
    model, variables, g, _ = case
    target = jnp.asarray(g["target"])

    def score(v, ids):
        logits = model.apply(v, ids)
        return logits[jnp.arange(logits.shape[0]), -1, target][:, None]

    seeded, y = dtd.explain(
        score,
        variables,
        jnp.asarray(g["ids"]),
        target=0,
        composite=C.AttnLRP(),
        seeds=["*/Llama.embed/embed_tokens"],
    )
    np.testing.assert_allclose(y[:, 0], g["score"], rtol=1e-5)
    (relevance,) = seeded.values()
    assert relative_l2(relevance, g["R_attnlrp"]) < RELEVANCE_TOLERANCE


def test_the_engine_finds_every_layer_by_its_hf_name(case):
    model, variables, g, score = case
    description = dtd.describe(score, variables, jnp.asarray(g["E"]), composite=C.AttnLRP())
    paths = [row.module_path.split("/", 1)[1] for row in description.layers]
    expected = []
    for i in range(LLAMA_TINY.num_layers):
        expected += [f"layers_{i}/self_attn/{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        expected += [f"layers_{i}/mlp/{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert paths == [*expected, "lm_head"]


# ---------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------


def test_loader_maps_hf_names_with_transposes():
    state = hf_random_state(LLAMA_TINY)
    params = flat_params(llama.from_huggingface(state, LLAMA_TINY))
    assert len(params) == len(state)
    np.testing.assert_array_equal(
        params["layers_1/self_attn/k_proj/kernel"], state["model.layers.1.self_attn.k_proj.weight"].T
    )
    assert params["layers_1/self_attn/k_proj/kernel"].shape == (32, 16)
    np.testing.assert_array_equal(
        params["layers_0/self_attn/o_proj/kernel"], state["model.layers.0.self_attn.o_proj.weight"].T
    )
    np.testing.assert_array_equal(
        params["layers_0/mlp/down_proj/kernel"], state["model.layers.0.mlp.down_proj.weight"].T
    )
    np.testing.assert_array_equal(
        params["layers_1/post_attention_layernorm/weight"],
        state["model.layers.1.post_attention_layernorm.weight"],
    )
    np.testing.assert_array_equal(params["norm/weight"], state["model.norm.weight"])
    np.testing.assert_array_equal(params["embed_tokens/embedding"], state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head/kernel"], state["lm_head.weight"].T)


def test_loader_ignores_rotary_buffers_and_detects_the_prefix():
    state = hf_random_state(LLAMA_TINY)
    base = llama.from_huggingface(state, LLAMA_TINY)
    buffers = {
        "model.rotary_emb.inv_freq": np.ones(4, np.float32),
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),  # older transformers
    }
    with_buffers = llama.from_huggingface({**state, **buffers}, LLAMA_TINY, prefix="model.")
    assert jax.tree_util.tree_structure(with_buffers) == jax.tree_util.tree_structure(base)
    bare = {k.removeprefix("model."): v for k, v in state.items()}  # LlamaModel names (+ a head)
    loaded = llama.from_huggingface(bare, LLAMA_TINY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, base)


def test_loader_tied_head():
    state = hf_random_state(TIED)
    assert "lm_head.weight" not in state  # a safetensors file of a tied model
    variables = llama.from_huggingface(state, TIED)
    assert "lm_head" not in variables["params"]
    listed_twice = {**state, "lm_head.weight": state["model.embed_tokens.weight"].copy()}  # state_dict()
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, llama.from_huggingface(listed_twice, TIED), variables
    )
    different = {**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1}
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        llama.from_huggingface(different, TIED)
    # tied logits are h @ embed_tokens^T: the same as an untied model whose head is the embedding
    untied_cfg = dataclasses.replace(TIED, tie_word_embeddings=False)
    untied = llama.from_huggingface(listed_twice, untied_cfg)
    ids = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)
    np.testing.assert_allclose(
        Llama(TIED).apply(variables, ids), Llama(untied_cfg).apply(untied, ids), rtol=1e-6, atol=1e-6
    )


def test_loader_errors_name_the_keys():
    state = hf_random_state(LLAMA_TINY)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match=r"missing 1 keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        llama.from_huggingface(missing, LLAMA_TINY)
    no_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(KeyError, match=r"missing 1 keys: lm_head\.weight"):  # untied: the head is needed
        llama.from_huggingface(no_head, LLAMA_TINY)
    extra = {**state, "model.layers.2.mlp.up_proj.weight": np.zeros((64, 32), np.float32)}
    with pytest.raises(KeyError, match=r"unexpected 1 keys: model\.layers\.2\.mlp\.up_proj\.weight"):
        llama.from_huggingface(extra, LLAMA_TINY)
    bias = {**state, "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}
    with pytest.raises(KeyError, match=r"unexpected 1 keys: model\.layers\.0\.self_attn\.q_proj\.bias"):
        llama.from_huggingface(bias, LLAMA_TINY)
    wrong = {**state, "model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}  # MHA k
    with pytest.raises(ValueError, match=r"k_proj\.weight .*shape \(32, 32\), expected \(32, 16\)"):
        llama.from_huggingface(wrong, LLAMA_TINY)


# ---------------------------------------------------------------------------------------------------
# Structure on random weights
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = Llama(LLAMA_TINY)
    variables = llama.from_huggingface(hf_random_state(LLAMA_TINY, seed=1), LLAMA_TINY)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 40, size=(2, 8)), jnp.int32)
    return model, variables, ids


def test_is_causal(tiny):
    model, variables, ids = tiny
    logits = model.apply(variables, ids)
    changed = model.apply(variables, ids.at[:, 4].set((ids[:, 4] + 1) % 40))
    np.testing.assert_allclose(changed[:, :4], logits[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed[:, 4:], logits[:, 4:])


def _left_padded(ids, pads: int, pad_id: int = 0):
    """Row 0 of ``ids`` shortened by ``pads`` tokens and left-padded; row 1 unchanged."""
    padded = ids.at[0, :pads].set(pad_id).at[0, pads:].set(ids[0, : ids.shape[1] - pads])
    mask = jnp.ones_like(ids).at[0, :pads].set(0)
    return padded, mask


def test_left_padding_gives_the_unpadded_logits(tiny):
    model, variables, ids = tiny
    padded, mask = _left_padded(ids, 3)
    logits = model.apply(variables, padded, mask)
    assert np.isfinite(np.asarray(logits)).all()  # the fully masked pad rows included
    alone = model.apply(variables, ids[:1, :5])  # positions 0..4 instead of 3..7: RoPE is relative
    np.testing.assert_allclose(logits[0, 3:], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, -1], alone[0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1], model.apply(variables, ids)[1], rtol=1e-6, atol=1e-6)
    other_pads = model.apply(variables, padded.at[0, :3].set(7), mask)
    np.testing.assert_allclose(other_pads[0, 3:], logits[0, 3:], rtol=1e-6, atol=1e-6)
    all_ones = model.apply(variables, ids, jnp.ones_like(ids))
    np.testing.assert_allclose(all_ones, model.apply(variables, ids), rtol=1e-6, atol=1e-6)


def test_fully_masked_rows_attend_uniformly_as_hf_eager():
    bias = llama.causal_bias(4, jnp.asarray([[0, 0, 1, 1]]))
    assert bias.shape == (1, 1, 4, 4)
    probs = jax.nn.softmax(jnp.zeros((1, 1, 4, 4)) + 3.0 * jnp.eye(4) + bias, axis=-1)
    np.testing.assert_allclose(probs[0, 0, :2], 0.25)  # queries 0 and 1 see only padding: uniform
    np.testing.assert_allclose(probs[0, 0, 2, :2], 0.0)
    np.testing.assert_allclose(probs[0, 0, 3, :2], 0.0)
    causal = llama.causal_bias(3)
    assert isinstance(causal, np.ndarray) and causal.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(causal[0, 0] == 0, np.tril(np.ones((3, 3), bool)))
    assert causal[0, 0, 0, 2] == np.finfo(np.float32).min


def test_left_padding_relevance(tiny):
    """AttnLRP relevance of a left-padded row: finite, exactly zero on the padding, and the relevance of
    the unpadded sequence on the tokens."""
    model, variables, ids = tiny
    padded, mask = _left_padded(ids, 3)
    composite = C.AttnLRP()

    def last_logit(mask):
        def score(v, e):
            return model.apply(v, e, mask, method=Llama.from_embeddings)[:, -1, 5]

        return score

    E = model.apply(variables, padded, method=Llama.embed)
    relevance = np.asarray(_relevance(last_logit(mask), variables, E, composite))
    assert np.isfinite(relevance).all()
    np.testing.assert_array_equal(relevance[0, :3], 0.0)
    E_alone = model.apply(variables, ids[:1, :5], method=Llama.embed)
    alone = _relevance(last_logit(None), variables, E_alone, composite)
    assert relative_l2(relevance[0, 3:], alone[0]) < RELEVANCE_TOLERANCE


def test_jit_equals_eager(tiny):
    model, variables, ids = tiny
    _, mask = _left_padded(ids, 2)
    for args in ((ids,), (ids, mask)):
        eager = model.apply(variables, *args)
        jitted = jax.jit(model.apply)(variables, *args)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)  # XLA fusion: ~1e-6


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize("cfg", [LLAMA_TINY, TIED], ids=["untied", "tied"])
def test_init_creates_exactly_the_hf_parameters(cfg):
    model = Llama(cfg)
    ids = jax.ShapeDtypeStruct((2, 7), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)
    assert _abstract(dict(variables)) == _abstract(llama.from_huggingface(hf_random_state(cfg), cfg))
    assert ("lm_head" in variables["params"]) == (not cfg.tie_word_embeddings)
    E = jax.eval_shape(lambda v, i: model.apply(v, i, method=Llama.embed), variables, ids)
    assert E.shape == (2, 7, cfg.hidden_size)
    logits = jax.eval_shape(lambda v, e: model.apply(v, e, method=Llama.from_embeddings), variables, E)
    assert logits.shape == (2, 7, cfg.vocab_size)
    # longer than max_position_embeddings: HF's default RoPE has no limit, neither has the twin
    assert jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 2050), jnp.int32)).shape[1] == 2050


def test_init_runs():
    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1)  # fmt: skip
    model = Llama(cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    np.testing.assert_array_equal(variables["params"]["norm"]["weight"], 1.0)
    assert np.isfinite(np.asarray(model.apply(variables, jnp.zeros((1, 2), jnp.int32)))).all()


def test_explicit_head_dim():
    cfg = LlamaConfig(vocab_size=10, hidden_size=12, intermediate_size=20, num_layers=1, num_heads=3,
                      num_kv_heads=3, head_dim=6)  # fmt: skip
    shapes = _abstract(jax.eval_shape(Llama(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    attention = shapes["params"]["layers_0"]["self_attn"]
    assert attention["q_proj"]["kernel"][0] == (12, 18) and attention["o_proj"]["kernel"][0] == (18, 12)
    assert _abstract(llama.from_huggingface(hf_random_state(cfg), cfg)) == shapes


def test_smollm2_135m_config_and_parameter_count():
    """The shapes of SmolLM2-135M (HuggingFaceTB): tied, GQA 9 / 3 heads, head_dim 64; 134,515,008
    parameters.  Abstract (``jax.eval_shape``): nothing is allocated."""
    hf = {**HF_TINY, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
          "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": None,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
          "tie_word_embeddings": True, "rope_interleaved": False}  # fmt: skip
    cfg = LlamaConfig.from_huggingface(hf)
    assert (cfg.head_dim, cfg.num_kv_groups, cfg.rope_theta, cfg.rms_norm_eps) == (64, 3, 100000.0, 1e-5)
    variables = jax.eval_shape(
        Llama(cfg).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables)) == 134_515_008
    assert "lm_head" not in variables["params"]


def test_rope_tables_follow_hf():
    cos, sin = llama.rope_tables(5, 8, 10000.0)
    assert cos.shape == sin.shape == (5, 8) and cos.dtype == np.float32
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    angles = np.arange(5)[:, None] * np.concatenate([inv_freq, inv_freq])[None, :]
    np.testing.assert_allclose(cos, np.cos(angles), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=1e-6, atol=1e-6)
    x = jnp.arange(8.0)
    np.testing.assert_array_equal(llama.rotate_half(x), [-4, -5, -6, -7, 0, 1, 2, 3])


def test_configs_validate():
    base = {"vocab_size": 10, "hidden_size": 16, "intermediate_size": 8, "num_layers": 1}
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(**base, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(**base, num_heads=3, num_kv_heads=1)
    with pytest.raises(ValueError, match="even"):
        LlamaConfig(**base, num_heads=2, num_kv_heads=1, head_dim=7)
    with pytest.raises(ValueError, match="positive int"):
        LlamaConfig(**{**base, "num_layers": 0}, num_heads=2, num_kv_heads=1)
    assert LlamaConfig(**base, num_heads=3, num_kv_heads=1, head_dim=4).head_dim == 4
    default = LlamaConfig(**base, num_heads=2, num_kv_heads=2)
    assert default == LlamaConfig(**base, num_heads=2, num_kv_heads=2, head_dim=8)
    mha = {k: v for k, v in HF_TINY.items() if k not in ("num_key_value_heads", "head_dim")}
    assert LlamaConfig.from_huggingface(mha).num_kv_heads == 4  # HF's default: as many as query heads
    for option, value in (
        ("hidden_act", "gelu"),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
        ("model_type", "qwen2"),
        ("partial_rotary_factor", 0.5),
    ):
        with pytest.raises(ValueError, match=option if option != "model_type" else "not a Llama"):
            LlamaConfig.from_huggingface({**HF_TINY, option: value})
    assert LlamaConfig.from_huggingface({**HF_TINY, "rope_scaling": {"type": "default"}}) == LLAMA_TINY
