"""Heatmap rendering: colormaps, normalization, channel reduction, overlays, grids, PNG files."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="jaxdtd.image needs matplotlib (pip install 'jaxdtd[image]')")

from matplotlib import image as mpl_image  # noqa: E402

from jaxdtd import image  # noqa: E402


def test_symmetric_normalization_puts_zero_at_the_centre_of_bwr():
    relevance = np.array([[[-2.0], [0.0], [1.0], [2.0]]])  # (1, 4, 1): H=1, W=4, C=1
    rgb = image.heatmap(relevance, cmap="bwr", mode="symmetric")
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], [0, 0, 255])  # most negative: blue
    np.testing.assert_array_equal(rgb[0, 1], [255, 255, 255])  # zero: white
    np.testing.assert_array_equal(rgb[0, 3], [255, 0, 0])  # most positive: red
    assert rgb[0, 2, 0] == 255 and 0 < rgb[0, 2, 1] < 255  # half-way: light red


def test_coldnhot_and_positive_mode():
    relevance = np.array([[-1.0, 0.0, 0.5, 1.0]])  # (H=1, W=4), no channel axis
    rgb = image.heatmap(relevance, cmap="coldnhot", channel_axis=None)
    np.testing.assert_array_equal(rgb[0, 0], [0, 255, 255])  # cyan
    np.testing.assert_array_equal(rgb[0, 1], [0, 0, 0])  # black at zero
    np.testing.assert_allclose(rgb[0, 2], [255, 0, 0], atol=3)  # red (a 255-entry table)
    np.testing.assert_array_equal(rgb[0, 3], [255, 255, 0])  # yellow
    positive = image.normalize(relevance, mode="positive")
    np.testing.assert_allclose(positive, [[0.0, 0.0, 0.5, 1.0]])
    np.testing.assert_allclose(image.normalize(relevance, mode="absolute"), [[1.0, 0.0, 0.5, 1.0]])


def test_normalization_is_per_image_with_percentile_clipping():
    batch = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 10.0)])
    batch[1, 0, 0] = 1000.0
    out = image.normalize(batch, mode="positive")
    np.testing.assert_allclose(out[0], 1.0)  # each image uses its own maximum
    clipped = image.normalize(batch, mode="positive", percentile=50)
    assert clipped[1, 0, 0] == 1.0 and clipped[1, 1, 1] == 1.0
    assert image.normalize(np.zeros((2, 2))).tolist() == [[0.5, 0.5], [0.5, 0.5]]  # no NaN on zeros


def test_channel_reduction():
    r = np.array([[[1.0, -3.0, 1.0]]])
    assert image.reduce_channels(r, how="sum").tolist() == [[-1.0]]
    assert image.reduce_channels(r, how="absmax").tolist() == [[-3.0]]
    np.testing.assert_allclose(image.reduce_channels(r, how="norm"), [[np.sqrt(11.0)]])
    with pytest.raises(ValueError, match="how must be 'sum', 'mean', 'absmax' or 'norm', got 'max'"):
        image.reduce_channels(r, how="max")


def test_overlay_grid_and_png_roundtrip(tmp_path):
    rgb = image.heatmap(np.random.default_rng(0).normal(size=(3, 5, 4, 1)))
    photo = np.full((5, 4, 3), 255, np.uint8)
    blended = image.overlay(rgb[0], photo, alpha=0.5)
    assert blended.shape == (5, 4, 3) and blended.min() >= 127
    tiles = image.grid(rgb, columns=2, padding=1)
    assert tiles.shape == (2 * 5 + 3, 2 * 4 + 3, 3)
    np.testing.assert_array_equal(tiles[1:6, 1:5], rgb[0])
    path = tmp_path / "grid.png"
    image.save_png(path, tiles, scale=2)
    back = mpl_image.imread(path)
    assert back.shape[:2] == (2 * tiles.shape[0], 2 * tiles.shape[1])
    np.testing.assert_allclose(back[::2, ::2, :3] * 255, tiles, atol=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        image.heatmap(np.zeros((2, 2, 1)), cmap="nope")
    with pytest.raises(ValueError, match="mode must be 'symmetric', 'absolute' or 'positive'"):
        image.normalize(np.zeros((2, 2)), mode="signed")
    with pytest.raises(ValueError, match=r"grid: expected \(N, H, W, 3\) images"):
        image.grid(np.zeros((2, 2, 3)))
