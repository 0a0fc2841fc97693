"""GPT-2 (Radford et al., 2019) in Flax linen, a twin of HuggingFace's ``GPT2LMHeadModel``.

Same computation as ``transformers.GPT2LMHeadModel`` with eager attention at inference (dropout
off): token embeddings plus learned positions, pre-LN blocks with causal self-attention and a
``gelu_new`` MLP, a final LayerNorm and the language-model head tied to the token embeddings::

    import jax, jax.numpy as jnp
    from jaxdtd.models.gpt2 import GPT2, GPT2Config

    config = GPT2Config(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=16)
    model = GPT2(config)
    ids = jnp.zeros((2, 8), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), ids)
    E = model.apply(variables, ids, method=GPT2.embed)                    # (2, 8, 32) = wte[ids]
    logits = model.apply(variables, E, method=GPT2.from_embeddings)       # (2, 8, 40)

Parameter tree (``params/...``) = HF names under ``transformer.`` with ``h.{i}`` as ``h_{i}``:
``wte``, ``wpe``, ``h_{i}/{ln_1, attn/c_attn, attn/c_proj, ln_2, mlp/c_fc, mlp/c_proj}``, ``ln_f``.
HF's ``Conv1D`` stores its weight as ``(in, out)`` already, which is Flax's ``Dense`` layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .bert import activation, map_state_dict

__all__ = ["GPT2", "GPT2Attention", "GPT2Block", "GPT2Config", "GPT2MLP", "from_huggingface"]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of GPT-2 (HF: ``n_embd``, ``n_layer``, ``n_head``, ``n_positions``, ``n_inner``)."""

    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 1024
    intermediate_size: int | None = None  # None: 4 * hidden_size
    layer_norm_eps: float = 1e-5
    activation_function: str = "gelu_new"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        activation(self.activation_function)

    @property
    def inner_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @classmethod
    def from_huggingface(cls, config: Mapping[str, Any]) -> GPT2Config:
        """The config of an HF GPT-2 ``config.json`` (a dict)."""
        for flag, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if config.get(flag, default) != default:
                raise ValueError(f"unsupported GPT-2 option {flag}={config[flag]!r}")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["n_embd"],
            num_layers=config["n_layer"],
            num_heads=config["n_head"],
            max_position_embeddings=config["n_positions"],
            intermediate_size=config.get("n_inner"),
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
            activation_function=config.get("activation_function", "gelu_new"),
        )


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention with fused ``c_attn`` (q, k, v) and output ``c_proj``.

    ``A = softmax(where(s <= t, q_t k_s / sqrt(d), finfo.min))``, as HF's eager ``GPT2Attention._attn``
    (the causal mask is a constant; masked scores are replaced, not shifted).
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, name="c_attn")(x)
        q, k, v = (y.reshape(batch, length, self.num_heads, head_dim) for y in jnp.split(qkv, 3, axis=-1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(head_dim))
        causal = np.tril(np.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, width)
        return nn.Dense(width, name="c_proj")(context)


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` with ``act`` the config's activation (``gelu_new``: tanh GELU)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.config.inner_size, name="c_fc")(x)
        h = activation(self.config.activation_function)(h)
        return nn.Dense(self.config.hidden_size, name="c_proj")(h)


class GPT2Block(nn.Module):
    """Pre-LN block: ``x = x + attn(ln_1(x))``, ``x = x + mlp(ln_2(x))``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = x + GPT2Attention(cfg.num_heads, name="attn")(
            nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="ln_1")(x)
        )
        return x + GPT2MLP(cfg, name="mlp")(nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="ln_2")(x))


class GPT2(nn.Module):
    """GPT-2 language model: ``ids (B, T) -> logits (B, T, vocab_size)``.

    * :meth:`embed`: ``E = wte[ids]`` (no positions);
    * :meth:`from_embeddings`: ``h = E + wpe[0:T]``, the blocks, ``ln_f``, ``logits = h wte^T``
      (HF with ``inputs_embeds``);
    * ``__call__``: ``from_embeddings(embed(ids))``; ``model.init`` through it creates every parameter.
    """

    config: GPT2Config

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.wte = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init)
        self.wpe = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init)
        self.h = [GPT2Block(cfg) for _ in range(cfg.num_layers)]
        self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_eps)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``wte[ids]``, ``(B, T, D)``."""
        return self.wte(input_ids)

    def from_embeddings(self, E: jax.Array) -> jax.Array:
        """Logits ``(B, T, vocab_size)`` from token embeddings; adds the position embeddings ``wpe[0:T]``."""
        length = E.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"{length} tokens exceed max_position_embeddings {self.config.max_position_embeddings}"
            )
        h = E + self.wpe(jnp.arange(length)[None, :])
        for block in self.h:
            h = block(h)
        return self.wte.attend(self.ln_f(h))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.from_embeddings(self.embed(input_ids))


def _gpt2_names(config: GPT2Config, prefix: str) -> dict[str, tuple[str, Any]]:
    same = lambda w: w  # Conv1D weights are (in, out) already
    names: dict[str, tuple[str, Any]] = {
        f"{prefix}wte.weight": ("wte/embedding", same),
        f"{prefix}wpe.weight": ("wpe/embedding", same),
    }
    modules = [("ln_f", "ln_f", "scale")]
    for i in range(config.num_layers):
        modules += [
            (f"h.{i}.ln_1", f"h_{i}/ln_1", "scale"),
            (f"h.{i}.attn.c_attn", f"h_{i}/attn/c_attn", "kernel"),
            (f"h.{i}.attn.c_proj", f"h_{i}/attn/c_proj", "kernel"),
            (f"h.{i}.ln_2", f"h_{i}/ln_2", "scale"),
            (f"h.{i}.mlp.c_fc", f"h_{i}/mlp/c_fc", "kernel"),
            (f"h.{i}.mlp.c_proj", f"h_{i}/mlp/c_proj", "kernel"),
        ]
    for hf, fx, weight in modules:
        names[f"{prefix}{hf}.weight"] = (f"{fx}/{weight}", same)
        names[f"{prefix}{hf}.bias"] = (f"{fx}/bias", same)
    return names


def from_huggingface(
    state: Mapping[str, Any], config: GPT2Config, prefix: str | None = None
) -> dict[str, Any]:
    """Flax variables ``{"params": ...}`` of :class:`GPT2` from an HF ``GPT2LMHeadModel`` state dict.

    Names ``transformer.wte.weight``, ``transformer.h.{i}.attn.c_attn.weight``, ...; ``prefix``
    ``None`` detects ``"transformer."`` (``GPT2LMHeadModel``) or none (``GPT2Model``). The attention
    buffers ``attn.bias`` / ``attn.masked_bias`` are ignored; ``lm_head.weight``, if present, must
    equal ``wte`` (the head is tied).

    Raises:
        KeyError: a weight is missing or a key is unknown.
        ValueError: a shape does not fit ``config``, or ``lm_head.weight`` is not tied to ``wte``.
    """
    if prefix is None:
        prefix = "transformer." if "transformer.wte.weight" in state else ""
    names = _gpt2_names(config, prefix)
    head = state.get("lm_head.weight")
    wte = state.get(f"{prefix}wte.weight")
    if head is not None and wte is not None and not np.array_equal(np.asarray(head), np.asarray(wte)):
        raise ValueError("lm_head.weight differs from wte.weight: GPT2 ties the language-model head to wte")

    def ignore(key: str) -> bool:
        buffer = key.startswith(f"{prefix}h.") and key.endswith((".attn.bias", ".attn.masked_bias"))
        return buffer or key == "lm_head.weight"

    template = jax.eval_shape(
        GPT2(config).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )
    return map_state_dict(state, names, template, ignore=ignore, what=f"GPT2 ({config})")
