"""``jaxdtd demo``: train a small CNN on scikit-learn's bundled digits and explain its decisions.

No download: the 1,797 8x8 digits ship with scikit-learn.  The demo trains with optax, explains
test digits with deep Taylor decomposition (z^B first layer for pixels in [0, 1], z+ above),
EpsilonPlusFlat and sensitivity analysis (the squared gradient), and prints the checks that make a
heatmap trustworthy: conservation (sum of relevance = class score) and positivity.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from . import baselines, composites, evaluate
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


def fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    extra_loss: Any = None,
    epochs: int = 12,
    batch_size: int = 64,
    seed: int = 0,
    verbose: bool = True,
    desc: str = "training",
    stream: Any = sys.stdout,
) -> tuple[Any, Any]:
    """Train :class:`DigitsCNN` on ``(x_train, y_train)`` with optax Adam (3e-3) on the cross-entropy
    plus ``extra_loss(model, variables, x, y)`` if given; shuffled batches, the last partial batch
    dropped.  Returns ``(model, variables)``."""
    import optax

    model = DigitsCNN()
    variables = model.init(jax.random.PRNGKey(seed), x_train[:1])
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(v):
            logits = model.apply(v, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if extra_loss is not None:
                loss = loss + extra_loss(model, v, x, y)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n_batches = len(x_train) // batch_size
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not verbose, file=stream)
    for _ in bar:
        order = rng.permutation(len(x_train))
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            variables, opt_state, loss = step(variables, opt_state, x_train[idx], y_train[idx])
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return model, variables


def train(epochs: int = 12, batch_size: int = 64, seed: int = 0, verbose: bool = True):
    """Train :class:`DigitsCNN` with optax Adam (:func:`fit`) on the digits' training split; returns
    ``(model, variables, test_x, test_y, accuracy)``."""
    x_train, y_train, x_test, y_test = load_digits(seed)
    model, variables = fit(x_train, y_train, epochs=epochs, batch_size=batch_size, seed=seed, verbose=verbose)
    accuracy = float((jnp.argmax(model.apply(variables, x_test), -1) == y_test).mean())
    return model, variables, x_test, y_test, accuracy


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


def explanations(model: Any, variables: Any, x: Any, target: Any) -> dict[str, Any]:
    """The demo's methods, each ``(attribution, output)`` for the given targets, jitted."""
    return {
        "DeepTaylor (z^B, z+)": jax.jit(
            lambda v, x: explain(model.apply, v, x, target=target, composite=composites.DeepTaylor(0.0, 1.0))
        )(variables, x),
        "EpsilonPlusFlat": jax.jit(
            lambda v, x: explain(model.apply, v, x, target=target, composite=composites.EpsilonPlusFlat())
        )(variables, x),
        "Sensitivity (grad^2)": baselines.sensitivity(model.apply, variables, x, target=target),
        "Gradient x input": baselines.gradient_x_input(model.apply, variables, x, target=target),
    }


def save_curves(
    path: Any,
    curves: dict[str, np.ndarray],
    xlabel: str = "pixels perturbed (most relevant first; uniform noise)",
) -> None:
    """Pixel-flipping curves (mean class score vs regions perturbed) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for name, curve in curves.items():
        axis.plot(
            np.arange(len(curve)),
            curve.mean(axis=1),
            label=name,
            linestyle="--" if "random" in name.lower() else "-",
        )
    axis.set_xlabel(xlabel)
    axis.set_ylabel("mean score of the explained class")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# jaxdtd demo report",
        "",
        f"{report['date']}: {report['model']} trained on scikit-learn's digits, test accuracy "
        f"{report['test_accuracy']:.3f}; {report['explained']} test digits explained "
        "(their predicted class); "
        f"pixel flipping: {report['flipping']}.",
        "",
        "| method | AOPC | median abs(sum R - f_c) / f_c | fraction R >= 0 |",
        "|---|---:|---:|---:|",
    ]
    for name, m in report["methods"].items():
        conservation = "-" if m["conservation_error"] is None else f"{m['conservation_error']:.2e}"
        positive = "-" if m["positive_fraction"] is None else f"{m['positive_fraction']:.3f}"
        lines.append(f"| {name} | {m['aopc']:.3f} | {conservation} | {positive} |")
    lines += ["", "Higher AOPC: the score drops faster when the pixels a method ranks first are perturbed."]
    return "\n".join(lines) + "\n"


def run(
    n_explain: int = 256, epochs: int = 12, verbose: bool = True, out_dir: str | None = "jaxdtd-demo"
) -> dict[str, Any]:
    """Train, explain ``n_explain`` test digits, evaluate with pixel flipping, print the checks; with
    ``out_dir`` write ``heatmaps.png``, ``pixel_flipping.png``, ``report.md`` and ``report.json``."""
    start = time.perf_counter()
    model, variables, x_test, y_test, accuracy = train(epochs=epochs, verbose=verbose)
    x, y = jnp.asarray(x_test[:n_explain]), jnp.asarray(y_test[:n_explain])
    logits = model.apply(variables, x)
    target = jnp.argmax(logits, -1)
    score = jnp.take_along_axis(logits, target[:, None], -1)[:, 0]
    positive = score > 0
    flip: dict[str, Any] = {"region": 1, "perturbation": "uniform", "low": 0.0, "high": 1.0, "repetitions": 4}
    key = jax.random.PRNGKey(0)
    methods: dict[str, dict[str, Any]] = {}
    curves: dict[str, np.ndarray] = {}
    heatmaps: dict[str, np.ndarray] = {}
    for name, (attribution, _) in explanations(model, variables, x, target).items():
        total = attribution.reshape(len(x), -1).sum(1)
        curve = evaluate.region_perturbation(
            model.apply, variables, x, attribution=attribution, target=target, key=key, **flip
        )
        curves[name] = np.asarray(curve)
        heatmaps[name] = np.asarray(attribution)
        methods[name] = {
            "aopc": float(evaluate.aopc(curve)),
            "conservation_error": float(jnp.median(jnp.abs(total - score)[positive] / score[positive])),
            "positive_fraction": float((attribution >= 0).mean()),
        }
    random_curve = evaluate.random_baseline(model.apply, variables, x, target=target, key=key, **flip)
    curves["Random order"] = np.asarray(random_curve)
    methods["Random order"] = {
        "aopc": float(evaluate.aopc(random_curve)),
        "conservation_error": None,
        "positive_fraction": None,
    }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "DigitsCNN (Conv16-Conv32-maxpool-Dense64-Dense10)",
        "test_accuracy": accuracy,
        "explained": int(len(x)),
        "flipping": "single pixels, most relevant first, replaced by uniform noise in [0, 1], 4 repetitions, "
        "AOPC over all 64 steps",
        "methods": methods,
    }
    if verbose:
        print(f"test accuracy: {accuracy:.3f} on {len(y_test)} held-out digits")
        print(f"explained {len(x)} test digits with their predicted class\n")
        print(f"{'method':<24} {'AOPC':>7} {'median |sum R - f_c| / f_c':>28} {'fraction R >= 0':>16}")
        for name, m in methods.items():
            conservation = "-" if m["conservation_error"] is None else f"{m['conservation_error']:.2e}"
            positive_fraction = "-" if m["positive_fraction"] is None else f"{m['positive_fraction']:.3f}"
            print(f"{name:<24} {m['aopc']:>7.3f} {conservation:>28} {positive_fraction:>16}")
        print(f"\nheatmaps of test digit 0 (label {int(y[0])}, predicted {int(target[0])}):")
        names = list(heatmaps)
        print("   ".join(f"{n[:16]:<16}" for n in names))
        rows = [ascii_heatmap(heatmaps[n][0, ..., 0]) for n in names]
        for lines in zip(*rows, strict=True):
            print("   ".join(lines))
    if out_dir is not None:
        import importlib.util
        import json
        import pathlib

        folder = pathlib.Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (folder / "report.md").write_text(report_markdown(report))
        written = ["report.md", "report.json"]
        if importlib.util.find_spec("matplotlib") is None:
            print("(pip install matplotlib to also get the heatmaps and curves as PNG)")
        else:
            save_heatmaps(folder / "heatmaps.png", np.asarray(x), heatmaps)
            save_curves(folder / "pixel_flipping.png", curves)
            written += ["heatmaps.png", "pixel_flipping.png"]
        if verbose:
            print(f"\nwrote {', '.join(written)} to {folder}/")
    if verbose:
        print(f"done in {time.perf_counter() - start:.1f} s")
    return report
