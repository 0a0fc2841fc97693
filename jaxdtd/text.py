"""Text heatmaps: token relevance -> words, coloured HTML and PNG renderings.

The relevance of a token is the sum of the relevance of its input embedding over the hidden axis,
``r_t = sum_d R[t, d]`` (relevance is additive, so this conserves what reached the embedding);
a word split into WordPiece pieces (``un ##believ ##able``) gets the sum over its pieces,
``r_word = sum_{t in word} r_t``.

Colours reuse :mod:`jaxdtd.image`: the same colormaps (:func:`jaxdtd.image.colormap`, including
``coldnhot``, ``wred``, ``wblue``) and the same normalisation per sentence
(:func:`jaxdtd.image.normalize`), with ``m`` the ``percentile`` of the values it scales by:

* ``symmetric`` (default): ``h = clip(r / m, -1, 1) * 0.5 + 0.5`` with ``m`` over ``|r|``, so zero
  relevance sits at the colormap's centre (white for ``bwr``);
* ``absolute``: ``clip(|r| / m, 0, 1)`` with ``m`` over ``|r|``;
* ``positive``: ``clip(max(r, 0) / m, 0, 1)`` with ``m`` over ``max(r, 0)`` (negative evidence hidden).

A sentence whose values are all zero (``m = 0``) is not divided by zero: every token gets the colour
of ``h(0)`` (the centre in ``symmetric`` mode, the low end otherwise).  NaN or infinite relevance is
an error, as is a relevance vector whose length differs from the number of tokens.

Rendering needs matplotlib (``pip install "jaxdtd[image]"``) for the colormaps; it is imported only
when a colour is computed, never by ``import jaxdtd``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from html import escape
from typing import Any, Literal

import numpy as np

__all__ = [
    "SPECIAL_TOKENS",
    "colors",
    "html",
    "html_document",
    "merge_subwords",
    "readable_tokens",
    "save_matrix_png",
    "save_png",
    "text_color",
    "token_relevance",
]

#: WordPiece special tokens that :func:`merge_subwords` drops with ``drop_special=True``.
SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]"})

#: a row of :func:`html_document` / :func:`save_png`: ``(label, tokens, relevance)``.
Row = tuple[str, Sequence[str], Any]

_MODES = ("symmetric", "absolute", "positive")


def _check(tokens: Sequence[str], relevance: Any, where: str) -> np.ndarray:
    """``relevance`` as a float64 vector of ``len(tokens)`` finite values, else ``ValueError``."""
    if isinstance(tokens, str):
        raise ValueError(f"{where}: tokens must be a sequence of strings, got the string {tokens!r}")
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"{where}: relevance must be one value per token (shape (T,)), got shape {r.shape}")
    if len(tokens) != r.shape[0]:
        raise ValueError(f"{where}: {len(tokens)} tokens but {r.shape[0]} relevance values")
    bad = ~np.isfinite(r)
    if bad.any():
        where_bad = ", ".join(f"{tokens[i]!r} (position {i})" for i in np.flatnonzero(bad)[:5])
        raise ValueError(f"{where}: relevance is NaN or infinite at {where_bad}")
    return r


def merge_subwords(
    tokens: Sequence[str],
    relevance: Any,
    *,
    drop_special: bool = False,
    special: frozenset[str] | set[str] = SPECIAL_TOKENS,
) -> tuple[list[str], np.ndarray]:
    """Merge WordPiece continuation pieces into their words, summing their relevance.

    A token ``##x`` continues the word before it: ``["un", "##believ", "##able"]`` becomes
    ``"unbelievable"`` with relevance ``r_un + r_##believ + r_##able`` (relevance is additive, so the
    total is unchanged).  A ``##`` piece with no word before it (first token, or right after a
    special token) starts a word of its own, without the ``##``.  Special tokens are never merged.

    ``drop_special=True`` removes the tokens in ``special`` (``[CLS]``, ``[SEP]``, ``[PAD]``) and
    their relevance: the rest then no longer sums to the total, and what the model routed through
    them (``[CLS]`` often carries a sizeable share, of either sign) is hidden.

    One sentence: ``tokens`` ``(T,)`` strings and ``relevance`` ``(T,)``.  Returns the words and
    their relevance as float64 ``(W,)``.

    Raises:
        ValueError: ``len(tokens) != len(relevance)``, relevance not 1-D, or NaN/inf relevance.
    """
    r = _check(tokens, relevance, "merge_subwords")
    words: list[str] = []
    values: list[float] = []
    open_word = False  # may the next ## piece join words[-1]?
    for token, value in zip(tokens, r, strict=True):
        if token in special:
            open_word = False
            if not drop_special:
                words.append(token)
                values.append(float(value))
        elif token.startswith("##") and open_word:
            words[-1] += token[2:]
            values[-1] += float(value)
        else:
            words.append(token[2:] if token.startswith("##") and len(token) > 2 else token)
            values.append(float(value))
            open_word = True
    return words, np.asarray(values, dtype=np.float64)


def token_relevance(R: Any, attention_mask: Any) -> np.ndarray:
    """Relevance per token ``r[b, t] = sum_d R[b, t, d]``, exactly 0 where ``attention_mask`` is 0.

    ``R`` is the relevance of the input embeddings ``(B, T, D)`` (or ``(T, D)`` with a ``(T,)``
    mask); returns float64 ``(B, T)`` (or ``(T,)``).  Padded positions are set to 0 whatever ``R``
    holds there (with a padding bias they should receive none, but the sum is not relied upon).
    """
    r = np.asarray(R, dtype=np.float64)
    mask = np.asarray(attention_mask)
    if r.ndim != mask.ndim + 1 or r.shape[:-1] != mask.shape:
        raise ValueError(
            f"token_relevance: R of shape {r.shape} does not match attention_mask of shape {mask.shape} "
            "(expected R (B, T, D) with a (B, T) mask)"
        )
    return np.where(mask != 0, r.sum(axis=-1), 0.0)


def _unit(values: np.ndarray, mode: str, percentile: float | None) -> np.ndarray:
    """``values`` ``(T,)`` normalised to ``[0, 1]`` as :func:`jaxdtd.image.normalize` does."""
    from . import image

    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if values.size == 0:
        return values
    return image.normalize(values[None, :], mode, 100.0 if percentile is None else percentile)[0]


def colors(
    relevance: Any, *, cmap: str = "bwr", mode: str = "symmetric", percentile: float | None = None
) -> np.ndarray:
    """The colour of each value of one sentence: ``uint8`` RGB ``(T, 3)``, ``colormap(h(r))``.

    ``h`` is the normalisation of the module docstring, over this sentence; ``percentile=None`` is
    the maximum (100)."""
    from . import image

    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"colors: expected relevance of shape (T,), got {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("colors: relevance is NaN or infinite")
    rgba = image.colormap(cmap)(_unit(r, mode, percentile))
    return np.round(np.asarray(rgba)[..., :3] * 255.0).astype(np.uint8).reshape(-1, 3)


def text_color(rgb: Any) -> str:
    """Black or white, whichever contrasts more with the background ``rgb`` (uint8 triple).

    WCAG relative luminance ``L = 0.2126 R + 0.7152 G + 0.0722 B`` of the linearised channels
    (``c / 12.92`` below ``0.04045``, else ``((c + 0.055) / 1.055) ** 2.4``); black above
    ``L = 0.179``, where the contrast ratios ``(L + 0.05) / 0.05`` and ``1.05 / (L + 0.05)`` cross."""
    c = np.asarray(rgb, dtype=np.float64)[:3] / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    luminance = float(linear @ np.array([0.2126, 0.7152, 0.0722]))
    return "#000000" if luminance > 0.179 else "#ffffff"


def _hex(rgb: Any) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def html(
    tokens: Sequence[str],
    relevance: Any,
    *,
    cmap: str = "bwr",
    mode: str = "symmetric",
    percentile: float | None = None,
) -> str:
    """One sentence as a ``<span class="jaxdtd-text">`` of coloured ``<span>`` tokens.

    Each token's background is ``colormap(h(r_t))`` (:func:`colors`), its text black or white for
    contrast (:func:`text_color`), its relevance in a ``title`` tooltip; tokens are HTML-escaped
    and separated by spaces.  Pass words from :func:`merge_subwords` to colour whole words.

    Raises:
        ValueError: length mismatch, NaN/inf relevance, unknown ``mode`` or ``cmap``.
    """
    r = _check(tokens, relevance, "html")
    rgb = colors(r, cmap=cmap, mode=mode, percentile=percentile)
    spans = [
        f'<span class="jaxdtd-token" style="background-color:{_hex(c)};color:{text_color(c)}" '
        f'title="{escape(token, quote=True)}: R = {value:+.4g}">{escape(token, quote=False)}</span>'
        for token, value, c in zip(tokens, r, rgb, strict=True)
    ]
    return '<span class="jaxdtd-text">' + " ".join(spans) + "</span>"


_LEGEND_TEXT = {
    "symmetric": ("-max |R|", "0", "+max |R|"),
    "absolute": ("0", "max |R| / 2", "max |R|"),
    "positive": ("0 (and negative)", "max R / 2", "max R"),
}

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
.jaxdtd-row { margin: 0 0 1.1em 0; }
.jaxdtd-label { font-size: 0.85em; color: #555; margin-bottom: 0.25em; }
.jaxdtd-text { font-size: 1.15em; line-height: 2em; }
.jaxdtd-token { padding: 0.15em 0.25em; border-radius: 0.2em; }
.jaxdtd-legend { margin: 1.5em 0 0 0; font-size: 0.85em; color: #555; }
.jaxdtd-bar { height: 0.9em; width: 20em; border: 1px solid #ccc; }
.jaxdtd-ticks { display: flex; justify-content: space-between; width: 20em; }
"""


def html_document(
    rows: Sequence[Row],
    *,
    title: str = "jaxdtd relevance",
    cmap: str = "bwr",
    mode: str = "symmetric",
    percentile: float | None = None,
    note: str | None = None,
) -> str:
    """A standalone HTML page: a heading, one :func:`html` sentence per ``(label, tokens, relevance)``
    row (each normalised on its own, as images are), a colour legend, and an optional ``note``
    paragraph (plain text, escaped).

    Raises:
        ValueError: no rows, or any row that :func:`html` rejects (the message names the row).
    """
    if not rows:
        raise ValueError("html_document: no rows to render")
    from . import image

    body = []
    for i, (label, tokens, relevance) in enumerate(rows):
        try:
            sentence = html(tokens, relevance, cmap=cmap, mode=mode, percentile=percentile)
        except ValueError as error:
            raise ValueError(f"html_document: row {i} ({label!r}): {error}") from None
        body.append(
            f'<div class="jaxdtd-row"><div class="jaxdtd-label">{escape(str(label))}</div>{sentence}</div>'
        )
    stops = np.round(np.asarray(image.colormap(cmap)(np.linspace(0.0, 1.0, 11)))[:, :3] * 255).astype(int)
    gradient = ", ".join(_hex(c) for c in stops)
    low, mid, high = _LEGEND_TEXT[mode]
    scale = "maximum" if percentile is None else f"{percentile:g}th percentile"
    legend = (
        '<div class="jaxdtd-legend">'
        f'<div class="jaxdtd-bar" style="background:linear-gradient(to right, {gradient})"></div>'
        f'<div class="jaxdtd-ticks"><span>{escape(low)}</span><span>{escape(mid)}</span>'
        f"<span>{escape(high)}</span></div>"
        f"<p>{escape(mode)} normalisation, colormap {escape(cmap)}; each sentence is scaled by its own "
        f"{scale}; hover over a token for its relevance.</p></div>"
    )
    extra = f"<p>{escape(note)}</p>" if note else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n{extra}\n" + "\n".join(body) + f"\n{legend}\n</body>\n</html>\n"
    )


def save_png(
    path: str | pathlib.Path,
    rows: Sequence[Row],
    *,
    cmap: str = "bwr",
    mode: str = "symmetric",
    percentile: float | None = None,
    width: int = 900,
    fontsize: float = 13.0,
    dpi: int = 100,
) -> pathlib.Path:
    """Render ``(label, tokens, relevance)`` rows as coloured word boxes into a PNG; returns ``path``.

    One block per row: its label (small, grey), then its tokens as boxes coloured like :func:`html`
    (same normalisation, per row), wrapped onto further lines when wider than ``width`` pixels; a
    colour legend at the bottom.  Drawn with matplotlib's Agg canvas (no pyplot, no global backend
    change).

    Raises:
        ValueError: no rows, or any row that :func:`html` would reject (the message names the row).
    """
    if not rows:
        raise ValueError("save_png: no rows to render")
    checked = []
    for i, (label, tokens, relevance) in enumerate(rows):
        try:
            r = _check(tokens, relevance, "save_png")
            checked.append((str(label), list(tokens), colors(r, cmap=cmap, mode=mode, percentile=percentile)))
        except ValueError as error:
            raise ValueError(f"save_png: row {i} ({label!r}): {error}") from None

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import IdentityTransform

    from . import image

    scale = dpi / 72.0  # points -> pixels
    word_font = FontProperties(size=fontsize)
    label_font = FontProperties(size=fontsize * 0.8)
    measure = FigureCanvasAgg(Figure(dpi=dpi)).get_renderer()

    def text_width(s: str, font: FontProperties) -> float:
        return measure.get_text_width_height_descent(s, font, ismath=False)[0] if s else 0.0

    margin, pad, gap = 12.0, 4.0 * scale, 4.0 * scale
    line_h = fontsize * scale * 1.8
    label_h = fontsize * scale * 1.3
    block_gap = fontsize * scale * 0.8
    legend_h = fontsize * scale * 3.2
    usable = width - 2 * margin

    # layout top-down in pixels: (kind, x, y_top, w, text, colour)
    items: list[tuple[str, float, float, float, str, Any]] = []
    y = margin
    for label, tokens, rgb in checked:
        items.append(("label", margin, y, 0.0, label, None))
        y += label_h
        x = margin
        for token, c in zip(tokens, rgb, strict=True):
            w = text_width(token, word_font) + 2 * pad
            if x > margin and x + w > margin + usable:
                x, y = margin, y + line_h
            items.append(("word", x, y, w, token, c))
            x += w + gap
        y += line_h + block_gap
    height = y + legend_h

    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(figure)
    pixels = IdentityTransform()
    box_h = fontsize * scale * 1.45
    for kind, x, top, w, s, c in items:
        if kind == "label":
            figure.text(
                x, height - top - label_h / 2, s, fontproperties=label_font, color="#555555",
                va="center", ha="left", transform=pixels, parse_math=False,
            )  # fmt: skip
            continue
        centre = height - top - line_h / 2
        rgb = np.asarray(c, dtype=np.float64) / 255.0
        figure.add_artist(
            Rectangle((x, centre - box_h / 2), w, box_h, facecolor=rgb, edgecolor="#dddddd",
                      linewidth=0.5, transform=pixels)
        )  # fmt: skip
        figure.text(
            x + pad, centre, s, fontproperties=word_font, color=text_color(c),
            va="center_baseline", ha="left", transform=pixels, parse_math=False,
        )  # fmt: skip
    # legend: the colormap as a bar with its three ticks
    bar_w, bar_h = min(300.0, usable), fontsize * scale * 0.8
    bar_bottom = legend_h - margin - bar_h
    axis = figure.add_axes((margin / width, bar_bottom / height, bar_w / width, bar_h / height))
    axis.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap=image.colormap(cmap), vmin=0, vmax=1)
    axis.set_yticks([])
    axis.set_xticks([0, 127.5, 255], list(_LEGEND_TEXT[mode]), fontsize=fontsize * 0.65)
    aligns: tuple[Literal["left", "center", "right"], ...] = ("left", "center", "right")
    for tick, align in zip(axis.get_xticklabels(), aligns, strict=True):
        tick.set_horizontalalignment(align)  # keep the end labels inside the figure
    figure.text(
        (margin + bar_w + 3 * gap) / width, (bar_bottom + bar_h / 2) / height,
        f"{mode} normalisation per sentence, colormap {cmap}", fontsize=fontsize * 0.65,
        color="#555555", va="center", ha="left", parse_math=False,
    )  # fmt: skip
    path = pathlib.Path(path)
    figure.savefig(path, format="png", facecolor="white")
    return path


def readable_tokens(pieces: Sequence[str]) -> list[str]:
    """Byte-level BPE pieces (each token decoded on its own, ``" the"``, ``"\\n"``) as labels for
    :func:`html` / :func:`save_png`, which separate tokens by a space: surrounding spaces stripped, a
    newline shown as ``⏎``, a tab as ``⇥``, a piece of spaces only as ``␣``."""
    labels = []
    for piece in pieces:
        shown = piece.replace("\n", "⏎").replace("\t", "⇥").strip(" ")
        labels.append(shown if shown else ("␣" if piece else "∅"))
    return labels


def save_matrix_png(
    path: str | pathlib.Path,
    matrix: Any,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    cmap: str = "bwr",
    boundary: int | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> pathlib.Path:
    """A relevance matrix ``(K, T)`` as a PNG heatmap, one row per explained token, one column per
    context token, each row scaled by its own ``max_t |M[k, t]|`` (symmetric, zero at the colormap's
    centre, as :func:`html` scales a sentence).  NaN cells (positions a row cannot see) are drawn
    light grey.  ``boundary`` draws a vertical line before that column (the end of the prompt).

    Raises:
        ValueError: ``matrix`` not 2-D, label counts that do not match its shape, or infinite values.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"save_matrix_png: expected a (K, T) matrix, got shape {m.shape}")
    if len(row_labels) != m.shape[0] or len(column_labels) != m.shape[1]:
        raise ValueError(
            f"save_matrix_png: {len(row_labels)} row and {len(column_labels)} column labels "
            f"for a matrix of shape {m.shape}"
        )
    if np.isinf(m).any():
        raise ValueError("save_matrix_png: the matrix holds infinite values")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from . import image

    scale = np.nanmax(np.abs(m), axis=1, keepdims=True) if m.size else np.ones((0, 1))
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    unit = np.clip(m / scale, -1.0, 1.0) * 0.5 + 0.5
    colormap = image.colormap(cmap)
    rgba = np.asarray(colormap(np.nan_to_num(unit, nan=0.5)))
    rgba[np.isnan(m)] = (0.92, 0.92, 0.92, 1.0)
    K, T = m.shape
    cell = 0.28
    width, height = max(4.0, 1.6 + cell * T), max(2.0, 1.4 + cell * K + 0.9)
    figure = Figure(figsize=(width, height), dpi=dpi, facecolor="white")
    FigureCanvasAgg(figure)
    axis = figure.add_axes((1.3 / width, 1.1 / height, (width - 1.5) / width, (height - 1.5) / height))
    axis.imshow(rgba, aspect="auto", interpolation="nearest")
    axis.set_xticks(range(T), list(column_labels), rotation=90, fontsize=7)
    axis.set_yticks(range(K), list(row_labels), fontsize=8)
    if boundary is not None and 0 < boundary < T:
        axis.axvline(boundary - 0.5, color="black", linewidth=1.0)
    if title:
        axis.set_title(title, fontsize=9)
    for label in (*axis.get_xticklabels(), *axis.get_yticklabels()):
        label.set_parse_math(False)  # "$" in a token is text, not mathtext
    path = pathlib.Path(path)
    figure.savefig(path, format="png", facecolor="white")
    return path
