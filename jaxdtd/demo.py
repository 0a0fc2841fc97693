"""``jaxdtd demo``: train a small CNN on scikit-learn's bundled digits and explain its decisions.

No download: the 1,797 8x8 digits ship with scikit-learn.  The demo trains with optax, explains
test digits with deep Taylor decomposition (z^B first layer for pixels in [0, 1], z+ above),
EpsilonPlusFlat and sensitivity analysis (the squared gradient), and prints the checks that make a
heatmap trustworthy: conservation (sum of relevance = class score) and positivity.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import composites
from .api import explain


class DigitsCNN(nn.Module):
    """Conv(16) -> ReLU -> Conv(32) -> ReLU -> maxpool 2 -> Dense(64) -> ReLU -> Dense(10), NHWC 8x8x1."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x))
        x = nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as NHWC float32 images in [0, 1]; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def _progress(label: str, done: int, total: int, extra: str = "") -> None:
    width = 30
    filled = int(width * done / total)
    sys.stdout.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}")
    if done == total:
        sys.stdout.write("\n")
    sys.stdout.flush()


def train(epochs: int = 12, batch_size: int = 64, seed: int = 0, verbose: bool = True):
    """Train :class:`DigitsCNN` with optax Adam; returns ``(model, variables, test_x, test_y, accuracy)``."""
    import optax

    x_train, y_train, x_test, y_test = load_digits(seed)
    model = DigitsCNN()
    variables = model.init(jax.random.PRNGKey(seed), x_train[:1])
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(v):
            logits = model.apply(v, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n_batches = len(x_train) // batch_size
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            variables, opt_state, loss = step(variables, opt_state, x_train[idx], y_train[idx])
        if verbose:
            _progress("training", epoch + 1, epochs, f"loss {float(loss):.3f}")
    accuracy = float((jnp.argmax(model.apply(variables, x_test), -1) == y_test).mean())
    return model, variables, x_test, y_test, accuracy


def sensitivity(apply_fn: Callable, variables: Any, x: Any, target: Any) -> Any:
    """Sensitivity analysis: the squared gradient of the target score, ``(d f_c / d x_i)^2``."""
    grad = jax.grad(lambda x: jnp.take_along_axis(apply_fn(variables, x), target[:, None], -1).sum())(x)
    return grad**2


def ascii_heatmap(relevance: np.ndarray) -> list[str]:
    """An 8x8 relevance map as text, darkest = most relevant."""
    shades = " .:-=+*#%@"
    r = np.maximum(relevance, 0)
    r = r / (r.max() + 1e-12)
    return ["".join(shades[min(int(v * len(shades)), len(shades) - 1)] * 2 for v in row) for row in r]


def save_heatmaps(path: Any, digits: np.ndarray, heatmaps: dict[str, np.ndarray], count: int = 8) -> None:
    """One PNG: a row per digit, columns input then one heatmap per method (needs matplotlib)."""
    from . import image

    columns = [image.heatmap(digits[:count], cmap="gray", mode="positive")]
    columns += [image.heatmap(h[:count], cmap="bwr", channel_axis=-1) for h in heatmaps.values()]
    tiles = np.stack([col[i] for i in range(count) for col in columns])
    image.save_png(path, image.grid(tiles, columns=len(columns), padding=1), scale=16)


def run(
    n_explain: int = 256, epochs: int = 12, verbose: bool = True, out_dir: str | None = None
) -> dict[str, dict[str, float]]:
    """Train, explain ``n_explain`` test digits, print and return the checks per method; with
    ``out_dir``, also write ``digits_heatmaps.png`` there."""
    start = time.perf_counter()
    model, variables, x_test, y_test, accuracy = train(epochs=epochs, verbose=verbose)
    x, y = jnp.asarray(x_test[:n_explain]), jnp.asarray(y_test[:n_explain])
    logits = model.apply(variables, x)
    target = jnp.argmax(logits, -1)
    score = jnp.take_along_axis(logits, target[:, None], -1)[:, 0]
    methods = {
        "DeepTaylor (z^B, z+)": composites.DeepTaylor(low=0.0, high=1.0),
        "EpsilonPlusFlat": composites.EpsilonPlusFlat(),
    }
    results: dict[str, dict[str, float]] = {}
    heatmaps = {}
    for name, composite in methods.items():
        explain_fn = jax.jit(lambda v, x, c=composite: explain(model.apply, v, x, target=target, composite=c))
        relevance, _ = explain_fn(variables, x)
        total = relevance.reshape(len(x), -1).sum(1)
        positive = score > 0
        results[name] = {
            "conservation_error": float(jnp.median(jnp.abs(total - score)[positive] / score[positive])),
            "positive_fraction": float((relevance >= 0).mean()),
        }
        heatmaps[name] = np.asarray(relevance)
    sens = sensitivity(model.apply, variables, x, target)
    results["Sensitivity (grad^2)"] = {
        "conservation_error": float(jnp.median(jnp.abs(sens.reshape(len(x), -1).sum(1) - score) / score)),
        "positive_fraction": float((sens >= 0).mean()),
    }
    heatmaps["Sensitivity (grad^2)"] = np.asarray(sens)
    if verbose:
        print(f"test accuracy: {accuracy:.3f} on {len(y_test)} held-out digits")
        print(f"explained {len(x)} test digits with their predicted class\n")
        print(f"{'method':<24} {'median |sum R - f_c| / f_c':>28} {'fraction R >= 0':>16}")
        for name, r in results.items():
            print(f"{name:<24} {r['conservation_error']:>28.2e} {r['positive_fraction']:>16.3f}")
        print(f"\nheatmaps of test digit 0 (label {int(y[0])}, predicted {int(target[0])}):")
        names = list(heatmaps)
        print("   ".join(f"{n[:16]:<16}" for n in names))
        rows = [ascii_heatmap(heatmaps[n][0, ..., 0]) for n in names]
        for lines in zip(*rows):
            print("   ".join(lines))
    if out_dir is not None:
        import importlib.util
        import pathlib

        if importlib.util.find_spec("matplotlib") is None:
            print("(pip install matplotlib to also get the heatmaps as a PNG)")
        else:
            path = pathlib.Path(out_dir) / "digits_heatmaps.png"
            save_heatmaps(path, np.asarray(x), heatmaps)
            if verbose:
                print(f"\nheatmaps of 8 test digits (input, {', '.join(heatmaps)}) written to {path}")
    if verbose:
        print(f"\ndone in {time.perf_counter() - start:.1f} s")
    results["_model"] = {"test_accuracy": accuracy}
    return results
