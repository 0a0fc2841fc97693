"""Vision Transformer (Dosovitskiy et al., ICLR 2021) in Flax linen, twin of HF ``ViTForImageClassification``.

Same computation as ``transformers.ViTForImageClassification`` with eager attention at inference
(dropout off), on NHWC images: a ``p x p`` stride-``p`` patch convolution, a class token,
learned position embeddings, pre-LN blocks (HF ``ViTLayer``), a final LayerNorm and a linear
classifier on the class token::

    import jax, jax.numpy as jnp
    from jaxdtd.models.vit import ViT, ViTConfig

    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64, num_labels=5)
    model = ViT(config)
    x = jnp.zeros((2, 16, 16, 3))                        # NHWC; HF's pixel_values are NCHW
    variables = model.init(jax.random.PRNGKey(0), x)
    logits = model.apply(variables, x)                   # (2, 5)

Parameter tree (``params/...``), with the HF name (under ``vit.``) it comes from:
``patch_embedding`` (``embeddings.patch_embeddings.projection``), ``cls_token``,
``position_embeddings``, ``layer_{i}/{layernorm_before, attention/{query,key,value}, attention_output,
layernorm_after, intermediate, output}`` (``encoder.layer.{i}.attention.attention.*``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``), ``layernorm`` and ``classifier``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .bert import SelfAttention, activation, map_state_dict

__all__ = ["ViT", "ViTConfig", "ViTLayer", "from_huggingface", "nchw_to_nhwc"]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a ViT classifier (HF ``ViTConfig`` names shortened; defaults: ViT-B/16)."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_labels: int = 1000
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        activation(self.hidden_act)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_huggingface(cls, config: Mapping[str, Any]) -> ViTConfig:
        """The config of an HF ViT ``config.json`` (a dict); ``num_labels`` from ``id2label``."""
        labels = config.get("num_labels") or len(config.get("id2label", {})) or 2
        return cls(
            image_size=config["image_size"],
            patch_size=config["patch_size"],
            num_channels=config.get("num_channels", 3),
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            num_labels=labels,
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            hidden_act=config.get("hidden_act", "gelu"),
            qkv_bias=config.get("qkv_bias", True),
        )


class ViTLayer(nn.Module):
    """Pre-LN ViT block: ``x = x + Dense(attention(LN(x)))``, ``x = x + Dense(act(Dense(LN(x))))``."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="layernorm_before")(x)
        h = SelfAttention(cfg.num_heads, use_bias=cfg.qkv_bias, name="attention")(h)
        x = nn.Dense(cfg.hidden_size, name="attention_output")(h) + x
        h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="layernorm_after")(x)
        h = activation(cfg.hidden_act)(nn.Dense(cfg.intermediate_size, name="intermediate")(h))
        return nn.Dense(cfg.hidden_size, name="output")(h) + x


class ViT(nn.Module):
    """ViT image classifier: NHWC ``(B, H, W, C)`` images of ``image_size`` -> ``(B, num_labels)`` logits.

    Tokens: ``[cls, patch_1, ..., patch_N] + position_embeddings``, patches in row-major order
    (as HF's ``flatten(2)`` of the NCHW convolution output).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"ViT expects NHWC images (B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}), "
                f"got shape {tuple(images.shape)}"
            )
        p = cfg.patch_size
        x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", name="patch_embedding")(images)
        batch = x.shape[0]
        x = x.reshape(batch, cfg.num_patches, cfg.hidden_size)
        init = nn.initializers.truncated_normal(0.02)
        cls_token = self.param("cls_token", init, (1, 1, cfg.hidden_size))
        positions = self.param("position_embeddings", init, (1, cfg.num_patches + 1, cfg.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, cfg.hidden_size)), x], axis=1)
        x = x + positions
        for i in range(cfg.num_layers):
            x = ViTLayer(cfg, name=f"layer_{i}")(x)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="layernorm")(x)
        return nn.Dense(cfg.num_labels, name="classifier")(x[:, 0])


def _vit_names(config: ViTConfig, prefix: str) -> dict[str, tuple[str, Any]]:
    same = lambda w: w
    names: dict[str, tuple[str, Any]] = {
        f"{prefix}embeddings.cls_token": ("cls_token", same),
        f"{prefix}embeddings.position_embeddings": ("position_embeddings", same),
        # torch Conv2d (out, in, kh, kw) -> Flax HWIO (kh, kw, in, out)
        f"{prefix}embeddings.patch_embeddings.projection.weight": (
            "patch_embedding/kernel",
            lambda w: w.transpose(2, 3, 1, 0),
        ),
        f"{prefix}embeddings.patch_embeddings.projection.bias": ("patch_embedding/bias", same),
    }
    linear = {"kernel": lambda w: w.T, "bias": same}
    norm = {"scale": same, "bias": same}

    def module(hf: str, fx: str, leaves: dict) -> None:
        for leaf, transform in leaves.items():
            names[f"{hf}.{'weight' if leaf in ('kernel', 'scale') else 'bias'}"] = (f"{fx}/{leaf}", transform)

    qkv = linear if config.qkv_bias else {"kernel": linear["kernel"]}
    for i in range(config.num_layers):
        hf, fx = f"{prefix}encoder.layer.{i}", f"layer_{i}"
        module(f"{hf}.layernorm_before", f"{fx}/layernorm_before", norm)
        for proj in ("query", "key", "value"):
            module(f"{hf}.attention.attention.{proj}", f"{fx}/attention/{proj}", qkv)
        module(f"{hf}.attention.output.dense", f"{fx}/attention_output", linear)
        module(f"{hf}.layernorm_after", f"{fx}/layernorm_after", norm)
        module(f"{hf}.intermediate.dense", f"{fx}/intermediate", linear)
        module(f"{hf}.output.dense", f"{fx}/output", linear)
    module(f"{prefix}layernorm", "layernorm", norm)
    module("classifier", "classifier", linear)
    return names


def from_huggingface(
    state: Mapping[str, Any], config: ViTConfig, prefix: str | None = None
) -> dict[str, Any]:
    """Flax variables ``{"params": ...}`` of :class:`ViT` from an HF ``ViTForImageClassification`` state dict.

    Names ``vit.embeddings.cls_token``, ``vit.encoder.layer.{i}.attention.attention.query.weight``, ...,
    ``vit.layernorm.*``, ``classifier.*``; ``prefix`` (of the backbone) ``None`` detects ``"vit."`` or none.
    Linear weights are transposed to ``(in, out)``, the patch projection to HWIO. An unused
    ``embeddings.mask_token`` and a pooler are ignored.

    Raises:
        KeyError: a weight is missing or a key is unknown.
        ValueError: a shape does not fit ``config``.
    """
    if prefix is None:
        prefix = "vit." if "vit.embeddings.cls_token" in state else ""
    names = _vit_names(config, prefix)
    ignored = (f"{prefix}embeddings.mask_token", f"{prefix}pooler.dense.weight", f"{prefix}pooler.dense.bias")
    shape = (1, config.image_size, config.image_size, config.num_channels)
    template = jax.eval_shape(
        ViT(config).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    return map_state_dict(state, names, template, ignore=lambda key: key in ignored, what=f"ViT ({config})")


def nchw_to_nhwc(pixels: Any) -> np.ndarray:
    """HF ``pixel_values`` ``(B, C, H, W)`` -> this model's ``(B, H, W, C)``."""
    return np.asarray(pixels).transpose(0, 2, 3, 1)
