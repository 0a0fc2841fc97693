"""BERT (Devlin et al., NAACL 2019) encoder in Flax linen, a twin of HuggingFace's ``BertModel``.

Same computation as ``transformers.BertModel`` in eager mode at inference (dropout off), with
mean pooling of sentence-transformers instead of BERT's pooler, split into the pieces an
explanation needs::

    import jax, jax.numpy as jnp
    from jaxdtd.models.bert import Bert, BertConfig

    config = BertConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=16)
    model = Bert(config)
    ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), ids, mask)
    E = model.apply(variables, ids, method=Bert.embed)                  # (2, 8, 32), before the LayerNorm
    pooled = model.apply(variables, E, mask, method=Bert.from_embeddings)  # (2, 32)
    assert jnp.allclose(pooled, model.apply(variables, ids, mask))

Real weights: :func:`from_huggingface` maps a ``BertModel`` state dict (numpy arrays, e.g. from
``safetensors.numpy.load_file``) to these variables; :mod:`jaxdtd.models.minilm` loads the pretrained
all-MiniLM-L6-v2 this way.

Parameter tree (``params/...``), with the HF name it comes from:

* ``word_embeddings``, ``position_embeddings``, ``token_type_embeddings``: ``embeddings.*_embeddings``;
* ``embeddings_norm``: ``embeddings.LayerNorm``;
* ``layer_{i}/attention/{query,key,value}``: ``encoder.layer.{i}.attention.self.{query,key,value}``;
* ``layer_{i}/attention_output``, ``layer_{i}/attention_norm``: ``...attention.output.{dense,LayerNorm}``;
* ``layer_{i}/intermediate``: ``...intermediate.dense``;
* ``layer_{i}/output``, ``layer_{i}/output_norm``: ``...output.{dense,LayerNorm}``.

Numerics: Flax's ``LayerNorm`` computes the variance as ``E[x^2] - E[x]^2`` (one pass), torch as
``E[(x - E[x])^2]``; in float32 the two agree to ~1e-6 relative on these activations.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "Bert",
    "BertConfig",
    "BertLayer",
    "SelfAttention",
    "activation",
    "from_huggingface",
    "map_state_dict",
    "padding_bias",
]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (HF ``BertConfig`` names shortened; defaults: bert-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        activation(self.hidden_act)  # validates the name

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_huggingface(cls, config: Mapping[str, Any]) -> BertConfig:
        """The config of an HF ``config.json`` (a dict) of ``model_type`` "bert"."""
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {kind!r}")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_position_embeddings=config["max_position_embeddings"],
            type_vocab_size=config.get("type_vocab_size", 2),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            pad_token_id=config.get("pad_token_id", 0),
            hidden_act=config.get("hidden_act", "gelu"),
        )


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # x Phi(x), torch's default (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation of an HF ``hidden_act`` / ``activation_function`` name."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention, ``(B, T, D) -> (B, T, D)`` (before the output dense).

    ``q, k, v = x W_q + b_q, ...`` split into ``num_heads`` heads of size ``d = D / num_heads``;
    ``A = softmax(q k^T / sqrt(d) + bias)`` over the keys; the result is ``A v`` with the heads merged.
    ``bias`` is additive and broadcasts to ``(B, heads, T, T)``, e.g. ``(B, 1, 1, T)`` from a padding mask.
    """

    num_heads: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.num_heads

        def heads(name: str) -> jax.Array:
            y = nn.Dense(width, use_bias=self.use_bias, name=name)(x)
            return y.reshape(batch, length, self.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(head_dim))
        if bias is not None:
            scores = scores + bias
        probs = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return context.reshape(batch, length, width)


def padding_bias(attention_mask: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """HF's extended attention mask: ``(1 - mask) * finfo(dtype).min``, shape ``(B, 1, 1, T)``."""
    mask = jnp.asarray(attention_mask).astype(dtype)[:, None, None, :]
    return (1.0 - mask) * jnp.finfo(dtype).min


class BertLayer(nn.Module):
    """A post-LN BERT block (HF ``BertLayer``), ``(B, T, D) -> (B, T, D)``.

    ``a = LN(x + Dense(attention(x)))``, ``y = LN(a + Dense(act(Dense(a))))``.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        context = SelfAttention(cfg.num_heads, name="attention")(x, bias)
        a = nn.Dense(cfg.hidden_size, name="attention_output")(context)
        a = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_norm")(a + x)
        h = activation(cfg.hidden_act)(nn.Dense(cfg.intermediate_size, name="intermediate")(a))
        y = nn.Dense(cfg.hidden_size, name="output")(h)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="output_norm")(y + a)


class Bert(nn.Module):
    """BERT encoder with masked mean pooling: ``(input_ids, attention_mask) -> (B, hidden_size)``.

    Methods (``model.apply(variables, ..., method=Bert.embed)``):

    * :meth:`embed`: ``E = W_word[ids] + W_type[token_type_ids] + W_pos[0:T]``, ``(B, T, D)``;
    * :meth:`encode`: ``LayerNorm(E)`` then the ``num_layers`` blocks, the last hidden state;
    * :meth:`from_embeddings`: ``encode`` and mean pooling ``sum_t h_t m_t / sum_t m_t``;
    * ``__call__``: ``from_embeddings(embed(ids))``; ``model.init`` through it creates every parameter.

    ``attention_mask`` (1 = token, 0 = padding) defaults to all ones; padded keys get the additive
    bias ``finfo.min`` as in HF, padded queries are computed but left out of the pooling.
    """

    config: BertConfig

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init)
        self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init)
        self.token_type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init)
        self.embeddings_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps)
        self.layer = [BertLayer(cfg) for _ in range(cfg.num_layers)]

    def embed(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        """Token + token-type + position embeddings ``(B, T, D)``, before the embeddings LayerNorm."""
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"{length} tokens exceed max_position_embeddings {self.config.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(length)[None, :]
        E = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return E + self.position_embeddings(positions)

    def encode(self, E: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The last hidden state ``(B, T, D)``: embeddings LayerNorm, then the BERT blocks."""
        if attention_mask is None:
            attention_mask = jnp.ones(E.shape[:2], jnp.int32)
        bias = padding_bias(attention_mask, E.dtype)
        h = self.embeddings_norm(E)
        for block in self.layer:
            h = block(h, bias)
        return h

    def from_embeddings(self, E: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Mean-pooled sentence embedding ``sum_t h_t m_t / max(sum_t m_t, 1e-9)``, ``(B, D)``."""
        if attention_mask is None:
            attention_mask = jnp.ones(E.shape[:2], jnp.int32)
        h = self.encode(E, attention_mask)
        m = jnp.asarray(attention_mask).astype(h.dtype)[..., None]
        return (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        return self.from_embeddings(self.embed(input_ids, token_type_ids), attention_mask)


# ---------------------------------------------------------------------------------------------------
# HuggingFace state dicts -> Flax variables
# ---------------------------------------------------------------------------------------------------

Transform = Callable[[np.ndarray], np.ndarray]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T  # torch Linear (out, in) -> Flax Dense (in, out)


def map_state_dict(
    state: Mapping[str, Any],
    names: Mapping[str, tuple[str, Transform]],
    template: Any,
    *,
    ignore: Callable[[str], bool] = lambda key: False,
    what: str = "model",
) -> dict[str, Any]:
    """Build ``{"params": ...}`` from a state dict: ``names[key] = ("a/b/kernel", transform)``.

    Every key of ``names`` must be in ``state`` and every key of ``state`` must be in ``names`` or
    ``ignore``d (KeyError listing the missing and unexpected ones); the result must have the
    parameter tree and shapes of ``template`` (``jax.eval_shape`` of ``init``; ValueError otherwise).
    Values are cast to the template's dtype.
    """
    missing = sorted(k for k in names if k not in state)
    unexpected = sorted(k for k in state if k not in names and not ignore(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_listing(unexpected)}")
        raise KeyError(f"the state dict does not match {what}: " + "; ".join(parts))
    expected = traverse_util.flatten_dict(template, sep="/")
    flat: dict[str, Any] = {}
    problems = []
    for key, (path, transform) in names.items():
        full = f"params/{path}"
        value = transform(np.asarray(state[key]))
        spec = expected.get(full)
        if spec is None:
            problems.append(f"{key} -> {full}: no such parameter")
        elif tuple(value.shape) != tuple(spec.shape):
            problems.append(f"{key} -> {full}: shape {tuple(value.shape)}, expected {tuple(spec.shape)}")
        else:
            flat[full] = jnp.asarray(value, spec.dtype)
    if not problems:
        problems = [f"{full}: no state dict entry maps to it" for full in expected if full not in flat]
    if problems:
        raise ValueError(f"the state dict does not match {what}: {_listing(problems)}")
    return traverse_util.unflatten_dict(flat, sep="/")


def _listing(items: Iterable[str], limit: int = 12) -> str:
    items = list(items)
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _linear(names: dict, hf: str, flax: str) -> None:
    names[f"{hf}.weight"] = (f"{flax}/kernel", _transpose)
    names[f"{hf}.bias"] = (f"{flax}/bias", _same)


def _layer_norm(names: dict, hf: str, flax: str) -> None:
    names[f"{hf}.weight"] = (f"{flax}/scale", _same)
    names[f"{hf}.bias"] = (f"{flax}/bias", _same)


def _bert_names(config: BertConfig, prefix: str) -> dict[str, tuple[str, Transform]]:
    p = prefix
    names: dict[str, tuple[str, Transform]] = {}
    for kind in ("word", "position", "token_type"):
        names[f"{p}embeddings.{kind}_embeddings.weight"] = (f"{kind}_embeddings/embedding", _same)
    _layer_norm(names, f"{p}embeddings.LayerNorm", "embeddings_norm")
    for i in range(config.num_layers):
        hf, fx = f"{p}encoder.layer.{i}", f"layer_{i}"
        for proj in ("query", "key", "value"):
            _linear(names, f"{hf}.attention.self.{proj}", f"{fx}/attention/{proj}")
        _linear(names, f"{hf}.attention.output.dense", f"{fx}/attention_output")
        _layer_norm(names, f"{hf}.attention.output.LayerNorm", f"{fx}/attention_norm")
        _linear(names, f"{hf}.intermediate.dense", f"{fx}/intermediate")
        _linear(names, f"{hf}.output.dense", f"{fx}/output")
        _layer_norm(names, f"{hf}.output.LayerNorm", f"{fx}/output_norm")
    return names


#: HF ``BertModel`` entries that have no counterpart here: index buffers and the (unused) pooler.
BERT_IGNORED = (
    "embeddings.position_ids",
    "embeddings.token_type_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
)


def _detect_prefix(state: Mapping[str, Any], candidate: str, probe: str) -> str:
    return candidate if f"{candidate}{probe}" in state else ""


def from_huggingface(
    state: Mapping[str, Any], config: BertConfig, prefix: str | None = None
) -> dict[str, Any]:
    """Flax variables ``{"params": ...}`` of :class:`Bert` from an HF ``BertModel`` state dict.

    ``state`` maps HF names (``embeddings.word_embeddings.weight``,
    ``encoder.layer.0.attention.self.query.weight``, ...) to arrays; linear weights ``(out, in)``
    are transposed to ``(in, out)``. ``prefix`` is prepended to every name; ``None`` detects
    ``"bert."`` (task models such as ``BertForSequenceClassification``) or none. Keys outside the
    prefix (task heads), the buffers ``embeddings.position_ids`` / ``token_type_ids`` and the pooler
    are ignored.

    Raises:
        KeyError: an encoder weight is missing or an unknown key lies under the prefix.
        ValueError: a weight has the wrong shape for ``config``.
    """
    if prefix is None:
        prefix = _detect_prefix(state, "bert.", "embeddings.word_embeddings.weight")
    names = _bert_names(config, prefix)
    ignored = {prefix + key for key in BERT_IGNORED}

    def ignore(key: str) -> bool:
        return key in ignored or not key.startswith(prefix)

    template = jax.eval_shape(
        Bert(config).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )
    return map_state_dict(state, names, template, ignore=ignore, what=f"Bert ({config})")


def glob_ignore(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A predicate for :func:`map_state_dict`: whether a key matches one of the ``fnmatch`` globs."""
    patterns = tuple(patterns)
    return lambda key: any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)
