"""Llama (Touvron et al., 2023) in Flax linen, a twin of HuggingFace's ``LlamaForCausalLM``.

Same computation as ``transformers.LlamaForCausalLM`` (4.52.4) with eager attention at inference
(dropout off, no cache): pre-norm decoder blocks with RMSNorm, rotary position embeddings (RoPE, HF's
``rotate_half`` convention), grouped-query attention (GQA) and a SwiGLU MLP, a final RMSNorm and the
language-model head (a separate ``lm_head`` or, tied, the token embeddings)::

    import jax, jax.numpy as jnp
    from jaxdtd.models.llama import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=16)
    model = Llama(config)
    ids = jnp.zeros((2, 8), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), ids)
    E = model.apply(variables, ids, method=Llama.embed)                   # (2, 8, 32) = embed_tokens[ids]
    logits = model.apply(variables, E, method=Llama.from_embeddings)      # (2, 8, 40)

Real weights: :func:`from_huggingface` maps a ``LlamaForCausalLM`` state dict (numpy arrays) to these
variables.

Parameter tree (``params/...``) = HF names under ``model.`` with ``layers.{i}`` as ``layers_{i}``:
``embed_tokens/embedding``; ``layers_{i}/input_layernorm/weight``,
``layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel``, ``layers_{i}/post_attention_layernorm/weight``,
``layers_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel``; ``norm/weight``; ``lm_head/kernel`` (absent when
``tie_word_embeddings``: the logits are then ``embed_tokens.attend``).  Linear weights are stored
``(in, out)``, the transpose of torch's ``(out, in)``; RMSNorm weights keep HF's name ``weight``.

The model is written with plain operations so that the relevance engine finds every rule in the jaxpr:
``nn.Dense(use_bias=False)`` layers, RMSNorm as ``weight * (x * rsqrt(mean(x^2) + eps))``, RoPE as
``q cos + rotate_half(q) sin`` with ``cos`` / ``sin`` numpy constants, GQA by ``jnp.repeat`` of the key
and value heads, the scores ``q k^T / sqrt(head_dim)`` plus an additive mask, ``jax.nn.softmax`` and
``down(silu(gate(x)) * up(x))``.  Differences from HF (none changes a float32 result beyond rounding):
the heads are kept in the layout ``(B, T, heads, head_dim)`` instead of HF's transposed
``(B, heads, T, head_dim)``; the RoPE tables are computed in numpy float32 (HF: torch float32, possibly
an ulp apart); ``max_position_embeddings`` is not enforced (HF does not either: default RoPE works at any
length).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .bert import _detect_prefix, _same, _transpose, glob_ignore, map_state_dict

__all__ = [
    "Llama",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaMLP",
    "LlamaRMSNorm",
    "apply_rotary_pos_emb",
    "causal_bias",
    "from_huggingface",
    "rope_tables",
    "rotate_half",
    "stack_layers",
    "unstack_layers",
]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder (HF ``LlamaConfig`` names shortened, see :meth:`from_huggingface`).

    ``head_dim`` ``None`` means ``hidden_size // num_heads``; it is resolved when the config is made, so
    ``config.head_dim`` is always an int.  The projections have no biases, the MLP activation is SiLU and
    RoPE is HF's default type (no scaling).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
        for name in (*sizes, "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads} (GQA)"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        head_dim = self.head_dim
        if not isinstance(head_dim, (int, np.integer)) or isinstance(head_dim, bool) or head_dim < 1:
            raise ValueError(f"LlamaConfig.head_dim must be a positive int or None, got {head_dim!r}")
        if head_dim % 2:
            raise ValueError(f"head_dim {head_dim} must be even (RoPE rotates pairs of dimensions)")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps >= 0:
            raise ValueError(f"rms_norm_eps must be >= 0, got {self.rms_norm_eps!r}")

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head (HF ``num_key_value_groups``)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_huggingface(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """The config of an HF Llama ``config.json`` (a dict): ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads`` (default: ``num_attention_heads``), ``rope_theta``,
        ``rms_norm_eps``, ``max_position_embeddings``, ``tie_word_embeddings``, ``head_dim``.

        Raises:
            ValueError: an option this twin does not implement (another ``model_type``, biases, an
                activation other than SiLU, RoPE scaling, partial or interleaved rotary embeddings).
        """
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"not a Llama config: model_type {model_type!r}")
        unsupported = {
            "hidden_act": (config.get("hidden_act", "silu"), "silu"),
            "attention_bias": (config.get("attention_bias", False), False),
            "mlp_bias": (config.get("mlp_bias", False), False),
            "partial_rotary_factor": (config.get("partial_rotary_factor", 1.0), 1.0),
            "rope_interleaved": (config.get("rope_interleaved", False), False),
        }
        for flag, (value, default) in unsupported.items():
            if value != default:
                raise ValueError(f"unsupported Llama option {flag}={value!r} (only {default!r})")
        scaling = config.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
            raise ValueError(f"unsupported Llama option rope_scaling={scaling!r} (only the default RoPE)")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim"),
        )


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------


class LlamaRMSNorm(nn.Module):
    """HF's ``LlamaRMSNorm``: ``weight * (x * rsqrt(mean(x^2) + eps))``, the statistics in float32.

    As HF: ``x`` is cast to float32, normalized, cast back to its dtype, then multiplied by ``weight``.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        dtype = x.dtype
        h = x.astype(jnp.float32)
        variance = jnp.mean(h**2, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(variance + self.eps)
        return weight * h.astype(dtype)


def rope_tables(length: int, head_dim: int, theta: float, dtype: Any = np.float32) -> tuple[np.ndarray, ...]:
    """``(cos, sin)``, each ``(length, head_dim)``, of HF's default ``LlamaRotaryEmbedding`` at positions
    ``0 .. length - 1``: ``inv_freq = 1 / theta^(arange(0, d, 2) / d)``, ``freqs = t * inv_freq``,
    ``emb = concat(freqs, freqs)``; in float32 as HF, then cast to ``dtype``.  numpy arrays: constants
    for the relevance rules."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate((freqs, freqs), axis=-1)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """HF's ``rotate_half``: ``(x1, x2) -> (-x2, x1)`` on the two halves of the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate((-x[..., half:], x[..., :half]), axis=-1)


def apply_rotary_pos_emb(x: jax.Array, cos: Any, sin: Any) -> jax.Array:
    """``x cos + rotate_half(x) sin`` for ``x`` of shape ``(B, T, heads, head_dim)``, ``cos`` / ``sin``
    ``(T, head_dim)`` (HF's ``apply_rotary_pos_emb`` on one tensor, heads on axis 2)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def causal_bias(length: int, attention_mask: Any = None, dtype: Any = jnp.float32) -> Any:
    """The additive attention mask of HF's eager Llama: 0 where query ``t`` may attend key ``s`` (``s <= t``
    and, with a ``(B, T)`` 0/1 ``attention_mask``, key ``s`` not padding), ``finfo(dtype).min`` elsewhere.

    Shape ``(1, 1, T, T)`` (a numpy constant) without a mask, ``(B, 1, T, T)`` with one.  A query whose
    keys are all masked (a left-padding position) gets the same score for every key, so its softmax is
    uniform, as in HF: no NaN.
    """
    allowed: np.ndarray | jax.Array = np.tril(np.ones((length, length), dtype=bool))[None, None]
    minimum = jnp.finfo(dtype).min  # jnp.finfo: also bfloat16
    if attention_mask is None:
        return np.where(allowed, 0.0, minimum).astype(dtype)
    mask = jnp.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[1] != length:
        raise ValueError(f"attention_mask must have shape (batch, {length}), got {mask.shape}")
    allowed = jnp.logical_and(allowed, (mask != 0)[:, None, None, :])
    return jnp.where(allowed, jnp.asarray(0.0, dtype), jnp.asarray(minimum, dtype))


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE (HF ``LlamaAttention`` with ``eager_attention_forward``).

    ``q, k, v`` by bias-free projections, RoPE on ``q`` and ``k``, the ``num_kv_heads`` key and value heads
    repeated ``num_kv_groups`` times (``repeat_kv``: query head ``h`` uses kv head ``h // groups``),
    ``A = softmax(q k^T / sqrt(head_dim) + bias)`` in float32, ``o_proj(A v)``.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: Any, sin: Any, bias: Any) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        d = cast(int, cfg.head_dim)  # an int once the config is made (LlamaConfig.__post_init__)

        def heads(name: str, n: int) -> jax.Array:
            y = nn.Dense(n * d, use_bias=False, name=name)(x)
            return y.reshape(batch, length, n, d)

        q = heads("q_proj", cfg.num_heads)
        k = heads("k_proj", cfg.num_kv_heads)
        v = heads("v_proj", cfg.num_kv_heads)
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        k = jnp.repeat(k, cfg.num_kv_groups, axis=2)
        v = jnp.repeat(v, cfg.num_kv_groups, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5)
        scores = scores + bias
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, cfg.num_heads * d)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="o_proj")(context)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = jax.nn.silu(nn.Dense(cfg.intermediate_size, use_bias=False, name="gate_proj")(x))
        up = nn.Dense(cfg.intermediate_size, use_bias=False, name="up_proj")(x)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="down_proj")(gate * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block (HF ``LlamaDecoderLayer``): ``x = x + self_attn(input_layernorm(x))``, then
    ``x = x + mlp(post_attention_layernorm(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: Any, sin: Any, bias: Any) -> jax.Array:
        cfg = self.config
        h = LlamaRMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
        x = x + LlamaAttention(cfg, name="self_attn")(h, cos, sin, bias)
        h = LlamaRMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        return x + LlamaMLP(cfg, name="mlp")(h)


class _ScannedDecoderLayer(LlamaDecoderLayer):
    """:class:`LlamaDecoderLayer` as an ``nn.scan`` step: ``(x, cos, sin, bias) -> (x', None)``."""

    # the (carry, output) pair nn.scan needs, from the same module (so the same parameter names)
    @nn.compact
    def __call__(  # type: ignore[override]
        self, x: jax.Array, cos: Any, sin: Any, bias: Any
    ) -> tuple[jax.Array, None]:
        return super().__call__(x, cos, sin, bias), None


class Llama(nn.Module):
    """Llama causal language model: ``ids (B, T) -> logits (B, T, vocab_size)``.

    * :meth:`embed`: ``E = embed_tokens[ids]``, ``(B, T, D)``;
    * :meth:`from_embeddings`: the decoder layers on ``E`` (positions ``0 .. T-1``, causal mask, optional
      padding mask), the final ``norm``, the head (HF with ``inputs_embeds``);
    * ``__call__``: ``from_embeddings(embed(ids), attention_mask)``; ``model.init`` through it creates
      every parameter.

    ``attention_mask`` ``(B, T)`` (1 = token, 0 = padding) is combined with the causal mask as in HF:
    padded keys get ``finfo.min``.  Positions stay ``0 .. T-1`` (HF's forward without ``position_ids``);
    RoPE depends only on relative positions, so a left-padded sequence gives the logits of the unpadded one
    at its tokens.

    ``scan_layers=True`` runs the decoder layers as one ``nn.scan`` over stacked parameters
    (``params/layers/...`` with a leading axis of ``num_layers``; :func:`stack_layers` /
    :func:`unstack_layers` convert the variables), so that ``jit`` compiles one layer instead of
    ``num_layers``; ``remat=True`` (with ``scan_layers``) checkpoints each layer (``nn.remat``): the
    gradient, and the relevance, keep only the residual stream per layer and recompute the rest.  The
    logits are the same as the unrolled model's, to float32 rounding.
    """

    config: LlamaConfig
    scan_layers: bool = False
    remat: bool = False

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init)
        if self.remat and not self.scan_layers:
            raise ValueError("Llama(remat=True) checkpoints the scanned layers: also set scan_layers=True")
        if self.scan_layers:
            step = nn.remat(_ScannedDecoderLayer) if self.remat else _ScannedDecoderLayer
            # the scanned layer stack, or the layers one by one (a list flax stores as a tuple)
            self.layers: _ScannedDecoderLayer | Sequence[LlamaDecoderLayer] = nn.scan(
                step,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
            )(cfg)
        else:
            self.layers = [LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers)]
        self.norm = LlamaRMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=init)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``embed_tokens[ids]``, ``(B, T, D)``."""
        return self.embed_tokens(input_ids)

    def from_embeddings(
        self, E: jax.Array, attention_mask: jax.Array | None = None, logits_to_keep: int = 0
    ) -> jax.Array:
        """Logits ``(B, T, vocab_size)`` from token embeddings ``E`` ``(B, T, D)``.

        ``logits_to_keep`` ``k > 0`` computes the head on the last ``k`` positions only (HF's
        ``logits_to_keep``): logits ``(B, k, vocab_size)``, the same values, without the
        ``(B, T, vocab_size)`` array a long prompt's next-token explanation does not need."""
        if not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        cfg = self.config
        length = E.shape[1]
        cos, sin = rope_tables(length, cast(int, cfg.head_dim), cfg.rope_theta, E.dtype)
        bias = causal_bias(length, attention_mask, E.dtype)
        h = E
        if self.scan_layers:
            h, _ = cast(_ScannedDecoderLayer, self.layers)(h, cos, sin, bias)
        else:
            for layer in cast(Sequence[LlamaDecoderLayer], self.layers):
                h = layer(h, cos, sin, bias)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        h = self.norm(h)
        if cfg.tie_word_embeddings:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, logits_to_keep: int = 0
    ) -> jax.Array:
        return self.from_embeddings(self.embed(input_ids), attention_mask, logits_to_keep)


def stack_layers(variables: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The variables of ``Llama(config, scan_layers=True)`` from those of the unrolled model: the
    parameters of ``layers_0 .. layers_{L-1}`` stacked along a new leading axis under ``layers``;
    everything else unchanged.

    Raises:
        KeyError: a ``layers_{i}`` for ``i < num_layers`` is missing, or one beyond it is present.
    """
    params = dict(variables["params"])
    names = [f"layers_{i}" for i in range(num_layers)]
    missing = [n for n in names if n not in params]
    extra = sorted(k for k in params if k.startswith("layers_") and k not in names)
    if missing or extra or "layers" in params:
        raise KeyError(
            f"stack_layers: expected params layers_0 .. layers_{num_layers - 1}, "
            f"missing {missing}, unexpected {extra + (['layers'] if 'layers' in params else [])}"
        )
    layers = [params.pop(n) for n in names]
    params["layers"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    return {**variables, "params": params}


def unstack_layers(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`stack_layers`: ``layers`` (leading axis ``L``) to ``layers_0 ..
    layers_{L-1}``."""
    params = dict(variables["params"])
    if "layers" not in params:
        raise KeyError("unstack_layers: no stacked 'layers' in params (already unrolled?)")
    stacked = params.pop("layers")
    length = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(length):
        params[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return {**variables, "params": params}


# ---------------------------------------------------------------------------------------------------
# HuggingFace state dicts -> Flax variables
# ---------------------------------------------------------------------------------------------------

#: HF buffers with no counterpart here (older transformers saved the RoPE frequencies in state dicts)
LLAMA_IGNORED = ("*rotary_emb.inv_freq",)
HEAD = "lm_head.weight"


def _llama_names(config: LlamaConfig, prefix: str) -> dict[str, tuple[str, Any]]:
    p = prefix
    names: dict[str, tuple[str, Any]] = {
        f"{p}embed_tokens.weight": ("embed_tokens/embedding", _same),
        f"{p}norm.weight": ("norm/weight", _same),
    }
    for i in range(config.num_layers):
        hf, fx = f"{p}layers.{i}", f"layers_{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{hf}.{norm}.weight"] = (f"{fx}/{norm}/weight", _same)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{hf}.self_attn.{proj}.weight"] = (f"{fx}/self_attn/{proj}/kernel", _transpose)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{hf}.mlp.{proj}.weight"] = (f"{fx}/mlp/{proj}/kernel", _transpose)
    if not config.tie_word_embeddings:
        names[HEAD] = ("lm_head/kernel", _transpose)
    return names


def from_huggingface(
    state: Mapping[str, Any], config: LlamaConfig, prefix: str | None = None
) -> dict[str, Any]:
    """Flax variables ``{"params": ...}`` of :class:`Llama` from an HF ``LlamaForCausalLM`` state dict.

    Names ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ...,
    ``model.norm.weight``, ``lm_head.weight``; linear weights ``(out, in)`` are transposed to
    ``(in, out)``.  ``prefix`` ``None`` detects ``"model."`` (``LlamaForCausalLM``) or none
    (``LlamaModel``); ``lm_head.weight`` never has the prefix.  With ``tie_word_embeddings`` the head
    is the token embedding: ``lm_head.weight`` may be absent (safetensors files) or present
    (``state_dict()`` lists tied tensors twice) and must then equal ``embed_tokens.weight``.
    ``rotary_emb.inv_freq`` buffers are ignored.

    Raises:
        KeyError: a weight is missing or a key is unknown (both listed).
        ValueError: a shape does not fit ``config``, or ``lm_head.weight`` differs from
            ``embed_tokens.weight`` while the config ties them.
    """
    if prefix is None:
        prefix = _detect_prefix(state, "model.", "embed_tokens.weight")
    names = _llama_names(config, prefix)
    buffers = glob_ignore(LLAMA_IGNORED)
    ignore = buffers
    if config.tie_word_embeddings:
        head, embedding = state.get(HEAD), state.get(f"{prefix}embed_tokens.weight")
        if (
            head is not None
            and embedding is not None
            and not np.array_equal(np.asarray(head), np.asarray(embedding))
        ):
            raise ValueError(
                f"{HEAD} differs from {prefix}embed_tokens.weight, but the config ties them "
                "(tie_word_embeddings=True); use tie_word_embeddings=False for a separate head"
            )
        ignore = lambda key: key == HEAD or buffers(key)  # noqa: E731
    template = jax.eval_shape(
        Llama(config).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )
    return map_state_dict(state, names, template, ignore=ignore, what=f"Llama ({config})")
