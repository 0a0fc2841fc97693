"""Heatmap rendering: relevance -> RGB images, overlays, grids and PNG files.

Built on matplotlib's colormaps (``pip install "jaxdtd[image]"``).  Relevance of shape
``(..., H, W, C)`` is reduced over channels, normalized and mapped through a colormap:

* ``symmetric`` (default): ``h = R / max|R|`` mapped from ``[-1, 1]`` to ``[0, 1]``, so zero
  relevance sits at the colormap's centre (white for ``bwr``, black for ``coldnhot``);
* ``absolute``: ``|R| / max|R|`` in ``[0, 1]``;
* ``positive``: ``max(R, 0) / max R`` in ``[0, 1]`` (negative evidence hidden).

The maximum is taken per image, optionally as a percentile to keep a few hot pixels from washing
out the rest.  Colormaps: any matplotlib name plus ``coldnhot`` (cyan-blue-black-red-yellow, the
diverging map LRP papers use on dark backgrounds) and ``wred``/``wblue`` (white to red/blue, for
positive maps).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["colormap", "grid", "heatmap", "normalize", "overlay", "reduce_channels", "save_png"]

_CUSTOM = {
    "coldnhot": [(0.0, (0.0, 1.0, 1.0)), (0.25, (0.0, 0.0, 1.0)), (0.5, (0.0, 0.0, 0.0)),
                 (0.75, (1.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 0.0))],
    "wred": [(0.0, (1.0, 1.0, 1.0)), (1.0, (0.8, 0.0, 0.0))],
    "wblue": [(0.0, (1.0, 1.0, 1.0)), (1.0, (0.0, 0.0, 0.8))],
}  # fmt: skip


_ENTRIES = 255


def colormap(name: str) -> Any:
    """A matplotlib colormap by name, including jaxdtd's ``coldnhot``, ``wred`` and ``wblue``."""
    try:
        import matplotlib
        from matplotlib.colors import LinearSegmentedColormap
    except ModuleNotFoundError as error:  # pragma: no cover - exercised only without matplotlib
        raise ModuleNotFoundError('jaxdtd.image needs matplotlib: pip install "jaxdtd[image]"') from error
    # an odd number of entries puts an entry exactly on the centre: zero relevance is exactly
    # white for bwr and black for coldnhot
    if name in _CUSTOM:
        return LinearSegmentedColormap.from_list(name, _CUSTOM[name], N=_ENTRIES)
    try:
        return matplotlib.colormaps[name].resampled(_ENTRIES)
    except KeyError:
        raise ValueError(
            f"unknown colormap {name!r}: use a matplotlib colormap name or one of {sorted(_CUSTOM)}"
        ) from None


def reduce_channels(relevance: Any, channel_axis: int | None = -1, how: str = "sum") -> np.ndarray:
    """Relevance per pixel: ``sum`` (conserves relevance), ``mean``, ``absmax`` or ``norm`` over channels.

    ``channel_axis=None`` means the input has no channel axis."""
    r = np.asarray(relevance, dtype=np.float64)
    if channel_axis is None:
        return r
    if how == "sum":
        return r.sum(axis=channel_axis)
    if how == "mean":
        return r.mean(axis=channel_axis)
    if how == "absmax":
        index = np.expand_dims(np.abs(r).argmax(axis=channel_axis), channel_axis)
        return np.take_along_axis(r, index, axis=channel_axis).squeeze(channel_axis)
    if how == "norm":
        return np.linalg.norm(r, axis=channel_axis)
    raise ValueError(f"reduce_channels: how must be 'sum', 'mean', 'absmax' or 'norm', got {how!r}")


def normalize(heat: Any, mode: str = "symmetric", percentile: float = 100.0) -> np.ndarray:
    """Map 2-D heat (or a batch ``(N, H, W)``) to ``[0, 1]`` per image (see the module docstring)."""
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim < 2:
        raise ValueError(f"normalize: expected (H, W) or (N, H, W) heat, got shape {h.shape}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"normalize: percentile must be in (0, 100], got {percentile}")
    axes = (-2, -1)

    def scale(values):
        top = np.percentile(values, percentile, axis=axes, keepdims=True)
        return np.where(top > 0, top, 1.0)

    if mode == "symmetric":
        return np.clip(h / scale(np.abs(h)), -1.0, 1.0) * 0.5 + 0.5
    if mode == "absolute":
        a = np.abs(h)
        return np.clip(a / scale(a), 0.0, 1.0)
    if mode == "positive":
        p = np.maximum(h, 0.0)
        return np.clip(p / scale(p), 0.0, 1.0)
    raise ValueError(f"normalize: mode must be 'symmetric', 'absolute' or 'positive', got {mode!r}")


def heatmap(
    relevance: Any,
    cmap: str = "bwr",
    mode: str = "symmetric",
    channel_axis: int | None = -1,
    how: str = "sum",
    percentile: float = 100.0,
) -> np.ndarray:
    """Relevance ``(..., H, W[, C])`` -> ``uint8`` RGB ``(..., H, W, 3)``."""
    heat = reduce_channels(relevance, channel_axis, how)
    values = normalize(heat, mode, percentile)
    rgba = colormap(cmap)(values)
    return np.round(rgba[..., :3] * 255.0).astype(np.uint8)


def overlay(rgb: Any, image: Any, alpha: float = 0.6) -> np.ndarray:
    """Blend a heatmap over a grey version of ``image`` (``uint8`` or float in ``[0, 1]``, HxW[x3])."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    base = np.asarray(image, dtype=np.float64)
    if base.dtype.kind in "ui" or base.max() > 1.0:
        base = base / 255.0
    if base.ndim == rgb.ndim and base.shape[-1] == 3:
        base = base.mean(axis=-1)
    elif base.ndim == rgb.ndim and base.shape[-1] == 1:
        base = base[..., 0]
    if base.shape != rgb.shape[:-1]:
        raise ValueError(f"overlay: image of shape {np.shape(image)} does not match heatmap {rgb.shape}")
    grey = np.repeat(base[..., None], 3, axis=-1)
    blended = alpha * (np.asarray(rgb, np.float64) / 255.0) + (1.0 - alpha) * grey
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def grid(images: Any, columns: int | None = None, padding: int = 2, fill: int = 255) -> np.ndarray:
    """Tile ``(N, H, W, 3)`` uint8 images into one image with ``columns`` per row."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"grid: expected (N, H, W, 3) images, got shape {images.shape}")
    n, h, w, _ = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    out = np.full(
        (rows * h + (rows + 1) * padding, columns * w + (columns + 1) * padding, 3), fill, dtype=np.uint8
    )
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        out[top : top + h, left : left + w] = images[i]
    return out


def save_png(path: Any, rgb: Any, scale: int = 1) -> None:
    """Write a uint8 RGB image as PNG (through matplotlib), enlarged ``scale`` times by pixel repetition."""
    from matplotlib import image as mpl_image

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"save_png: expected an (H, W, 3) image, got shape {rgb.shape}")
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    mpl_image.imsave(path, rgb)
