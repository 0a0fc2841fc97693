"""The attention core evaluated in blocks of query rows (``jaxdtd.attention``).

* The fused, blocked relevance equals the unit-by-unit relevance (``attention_block=0``; the LXT
  golden files check the default, fused path) on every attention the model zoo writes: Llama (RoPE,
  grouped-query heads, causal mask, under ``nn.scan`` + ``nn.remat``), BERT with a padding mask,
  GPT-2 and ViT; in one block and in blocks that do not divide the rows (a padded last block); under
  ``jit`` and ``vmap`` over targets.
* What is fused: one core per layer; nothing when the attention weights are also an output or
  tapped (the tap then equals the unfused one).
* Memory, from XLA's analysis of the compiled programs: at 512 tokens the blocked relevance
  program needs fewer temporaries than ``jax.grad`` (which keeps the ``(heads, T, T)`` weights) and
  than the unit-by-unit relevance.
* A bad ``attention_block`` is a ``TypeError`` naming it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd.attention import AttentionUnit
from jaxdtd.models.bert import Bert, BertConfig
from jaxdtd.models.gpt2 import GPT2, GPT2Config
from jaxdtd.models.llama import Llama, LlamaConfig
from jaxdtd.models.vit import ViT, ViTConfig

LLAMA = LlamaConfig(
    vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    max_position_embeddings=32,
)  # fmt: skip
BERT = BertConfig(
    vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
    max_position_embeddings=16, type_vocab_size=2,
)  # fmt: skip
GPT = GPT2Config(vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, max_position_embeddings=16)
VIT = ViTConfig(
    image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_layers=1, num_heads=4,
    intermediate_size=64, num_labels=5,
)  # fmt: skip
TOKENS = 10  # rows: blocks of 3 leave a padded last block


def _text_model(model, vocab_size: int, *extra):
    """``(fn, variables, E)``: ``fn(v, E)`` runs ``model`` from the embeddings ``E`` of random ids
    (``extra``: further arguments of ``from_embeddings``, e.g. a padding mask)."""
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, TOKENS), 0, vocab_size)
    variables = model.init(jax.random.PRNGKey(0), ids)
    cls = type(model)
    return (
        (lambda v, e: model.apply(v, e, *extra, method=cls.from_embeddings)),
        variables,
        model.apply(variables, ids, method=cls.embed),
    )


def _llama():
    return _text_model(Llama(LLAMA, scan_layers=True, remat=True), LLAMA.vocab_size)


def _bert():
    mask = jnp.ones((2, TOKENS), jnp.int32).at[1, 7:].set(0)  # the second sentence is padded
    return _text_model(Bert(BERT), BERT.vocab_size, mask)


def _gpt2():
    return _text_model(GPT2(GPT), GPT.vocab_size)


def _vit():
    model = ViT(VIT)
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
    return model.apply, model.init(jax.random.PRNGKey(0), images), images


MODELS = {
    "llama-scan-remat": _llama,
    "bert-padding-mask": _bert,
    "gpt2": _gpt2,
    "vit": _vit,
}


def _score(fn):
    """A scalar per sample: the last position's (or the only) output, a fixed projection."""

    def score(v, x):
        y = fn(v, x)
        y = y[:, -1] if y.ndim == 3 else y
        return y @ jnp.linspace(-1.0, 1.0, y.shape[-1])

    return score


def _relevance(fn, variables, x, block, composite=C.AttnLRP):
    f = dtd.transform(_score(fn), dataclasses.replace(composite(), attention_block=block))
    return np.asarray(jax.jit(jax.grad(lambda x: f(variables, x).sum()))(x))


def _fused(fn, variables, x, block=None, composite=C.AttnLRP) -> list[AttentionUnit]:
    comp = dataclasses.replace(composite(), attention_block=block)
    plan = dtd.trace_plan(_score(fn), comp, (variables, x))
    units = list(plan.units)
    for unit in plan.units:  # a scan's body is a plan of its own
        if hasattr(unit, "body"):
            units += list(unit.body.units)
    return [u for u in units if isinstance(u, AttentionUnit)]


@pytest.mark.parametrize("name", list(MODELS))
def test_blocked_relevance_equals_unit_by_unit(name):
    fn, variables, x = MODELS[name]()
    reference = _relevance(fn, variables, x, 0)
    assert not _fused(fn, variables, x, 0)
    (fused,) = _fused(fn, variables, x, 3)  # one core (one layer; the scan: one body)
    assert fused.block == 3 and fused.row_axis is not None
    scale = np.abs(reference).max()
    assert scale > 0
    for block in (None, 3):  # one block; 4 blocks of 3 rows, the last padded
        np.testing.assert_allclose(_relevance(fn, variables, x, block), reference, atol=2e-5 * scale, rtol=0)


def test_blocked_relevance_under_vmap_over_targets():
    fn, variables, x = _llama()
    basis = jnp.eye(LLAMA.vocab_size)[:4]
    out = {}
    for block in (0, 3):
        comp = dataclasses.replace(C.AttnLRP(), attention_block=block)
        f = dtd.transform(lambda v, e: fn(v, e)[:, -1], comp)

        def rows(basis, f=f):
            y, vjp = jax.vjp(lambda e: f(variables, e), x)
            return jax.vmap(lambda c: vjp(jnp.broadcast_to(c, y.shape))[0])(basis)

        out[block] = np.asarray(jax.jit(rows)(basis))
    assert out[3].shape == (4, *x.shape)
    np.testing.assert_allclose(out[3], out[0], atol=2e-6 * np.abs(out[0]).max(), rtol=0)


def test_cplrp_leaves_no_core_to_fuse_and_is_unchanged():
    fn, variables, x = _llama()
    assert _fused(fn, variables, x, 3)
    assert not _fused(fn, variables, x, 3, C.CPLRP)  # the softmax output is a constant: no core
    np.testing.assert_array_equal(
        _relevance(fn, variables, x, 3, C.CPLRP), _relevance(fn, variables, x, 0, C.CPLRP)
    )


def _attention(q, k, v, mask):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0 + mask
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _qkv(length: int, heads: int = 4, dim: int = 16):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, length, heads, dim)) for key in keys)
    mask = jnp.where(jnp.tril(jnp.ones((length, length), bool)), 0.0, jnp.finfo(jnp.float32).min)
    return (q, k, v), mask


def test_weights_that_are_also_an_output_or_tapped_are_not_fused():
    (q, k, v), mask = _qkv(6)

    def both(_, t):
        s = jnp.einsum("bqhd,bkhd->bhqk", t[0], t[1]) / 4.0 + mask
        a = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", a, t[2]).sum(), a.sum()

    comp = dataclasses.replace(C.AttnLRP(), attention_block=2)
    assert not [
        u for u in dtd.trace_plan(both, comp, (None, (q, k, v))).units if isinstance(u, AttentionUnit)
    ]

    def one(_, t):
        return _attention(*t, mask)[:, -1].reshape(1, -1)

    assert [u for u in dtd.trace_plan(one, comp, (None, (q, k, v))).units if isinstance(u, AttentionUnit)]
    tapped = {}
    for block in (0, 2):
        c = dataclasses.replace(C.AttnLRP(), attention_block=block)
        r, _, taps = dtd.explain(one, None, (q, k, v), target=5, composite=c, taps=["*:softmax"])
        tapped[block] = (r, taps)
    (name,) = tapped[0][1]
    np.testing.assert_array_equal(tapped[2][1][name], tapped[0][1][name])
    for a, b in zip(tapped[2][0], tapped[0][0], strict=True):
        np.testing.assert_array_equal(a, b)


def _bfloat16_attention(q, k, v, mask):
    """As the Llama of jaxdtd.models (and HF): bfloat16 products, the softmax in float32."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0 + mask
    a = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(jnp.bfloat16)
    return jnp.einsum("bhqk,bkhd->bqhd", a, v)


def test_bfloat16_blocks_sum_in_float32_and_match_the_units():
    (q, k, v), mask = _qkv(12)
    t = tuple(a.astype(jnp.bfloat16) for a in (q, k, v))
    mask = jnp.where(mask == 0, 0.0, jnp.finfo(jnp.bfloat16).min).astype(jnp.bfloat16)
    out = {}
    for block in (0, 5):
        c = dataclasses.replace(C.AttnLRP(), attention_block=block)
        f = dtd.transform(lambda _, t: _bfloat16_attention(*t, mask)[:, -4:].sum(), c)
        assert _fused_in(lambda _, t: _bfloat16_attention(*t, mask)[:, -4:].sum(), c, t) == (block != 0)
        out[block] = jax.jit(jax.grad(lambda t, f=f: f(None, t).astype(jnp.float32)))(t)
    for blocked, units in zip(out[5], out[0], strict=True):
        assert blocked.dtype == jnp.bfloat16
        blocked, units = np.asarray(blocked, np.float32), np.asarray(units, np.float32)
        assert np.isfinite(units).all() and np.abs(units).max() > 0
        np.testing.assert_allclose(blocked, units, atol=2e-2 * np.abs(units).max(), rtol=0)


def _fused_in(fn, composite, t) -> bool:
    return any(isinstance(u, AttentionUnit) for u in dtd.trace_plan(fn, composite, (None, t)).units)


def test_blocked_relevance_needs_less_memory_than_the_gradient():
    """At 512 tokens (4 heads) one ``(heads, T, T)`` array is 4 MiB: the gradient keeps the attention
    weights and its backward builds two more; the blocked relevance keeps none of them."""
    (q, k, v), mask = _qkv(512)

    def score(t):
        return _attention(*t, mask)[0, -1].sum()

    def temporaries(fn) -> int:
        return jax.jit(fn).lower((q, k, v)).compile().memory_analysis().temp_size_in_bytes

    def relevance(block):
        f = dtd.transform(lambda _, t: score(t), dataclasses.replace(C.AttnLRP(), attention_block=block))
        return lambda t: jax.grad(lambda t: f(None, t))(t)

    gradient, unfused, blocked = (
        temporaries(jax.grad(score)),
        temporaries(relevance(0)),
        temporaries(relevance(64)),
    )
    array = 4 * 512 * 512 * 4
    print(f"temporaries: gradient {gradient}, unit by unit {unfused}, blocked {blocked}")
    assert unfused > 2 * array  # unit by unit: several (heads, T, T) arrays at once
    assert blocked < min(gradient, unfused) - 2 * array  # blocks of 64 rows: a fraction of one array


@pytest.mark.parametrize("bad", [-1, 2.5, "64"])
def test_bad_attention_block_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"Composite.attention_block must be None, 0 or a positive number"):
        C.Composite(attention_block=bad)
