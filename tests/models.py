"""Small Flax linen models shared by the tests and the zennit golden generator.

The golden files in ``tests/reference/`` store parameters in exactly this layout
(``params/<Module>/kernel`` as HWIO / (in, out), ``params/<Module>/bias``), inputs in NHWC.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """Dense(8) -> ReLU -> Dense(8) -> ReLU -> Dense(5)."""

    features: tuple[int, ...] = (8, 8, 5)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = nn.Dense(width, name=f"Dense_{i}")(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class CNN(nn.Module):
    """Conv3x3(4, SAME) -> ReLU -> maxpool 2 -> Conv3x3(6, SAME) -> ReLU -> avgpool 2
    -> flatten (H, W, C order) -> Dense(10) -> ReLU -> Dense(5).  Input NHWC (N, 8, 8, 3)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding="SAME", name="Conv_0")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(6, (3, 3), padding="SAME", name="Conv_1")(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(10, name="Dense_0")(x)
        x = nn.relu(x)
        x = nn.Dense(5, name="Dense_1")(x)
        return x


def tiny_bert():
    """A one-layer BERT (hidden 8, 2 heads, vocabulary 30, 8 positions) for quick transformer tests."""
    from jaxdtd.models import bert

    config = bert.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    )
    return bert.Bert(config)


def params_from_flat(flat: dict[str, object]) -> dict:
    """``{'params/Conv_0/kernel': array, ...}`` -> Flax variables ``{'params': {...}}``."""
    variables: dict = {}
    for key, value in flat.items():
        node = variables
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value)
    return variables
