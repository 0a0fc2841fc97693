"""Model zoo (Flax linen) for tests, benchmarks and notebooks.

Submodules are imported lazily, so ``import jaxdtd`` stays light:

* :mod:`jaxdtd.models.classic`: ``LeNet``, ``VGG16``, ``ResNet18``, ``ResNet50``, ``InceptionBlock``
  (and small variants used by the tests);
* :mod:`jaxdtd.models.efficientnet`: ``EfficientNetLite0``, ``efficientnet_lite0(pretrained=True)``
  with real ImageNet weights read without torch, ``preprocess`` and ``imagenet_classes``.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("classic", "efficientnet", "torch_pickle")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
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
