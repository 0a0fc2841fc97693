"""benchmarks/gpu.sh runs end to end (its tiny CPU configuration) and writes a results table."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_gpu_script_tiny_config_on_cpu(tmp_path):
    out = tmp_path / "results.md"
    env = dict(os.environ, TINY="1", PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = out.read_text()
    for dtype in ("float32", "bfloat16"):
        assert f"**vggish**, 16x16x3, {dtype}, batch 2" in text
    for program in ("gradient", "EpsilonPlusFlat", "EpsilonGammaBox", "DeepTaylor"):
        assert f"| {program} |" in text
