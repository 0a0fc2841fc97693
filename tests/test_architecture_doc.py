"""docs/architecture.md's "how to add a primitive" and "how to add a rule" do what they say: every
```python block runs, in order, in one namespace (each block asserts its own result)."""

from __future__ import annotations

import pathlib
import re

from jaxdtd import primitives

DOC = pathlib.Path(__file__).parent.parent / "docs" / "architecture.md"


def test_architecture_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    try:
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102
        assert primitives.lookup("my_softsign") is not None
        assert namespace["DoubleBiasEpsilon"]().proportional_to_input is False  # its 0 * x branch
    finally:
        primitives.REGISTRY.pop("my_softsign", None)  # the registry is module state: leave it as found
