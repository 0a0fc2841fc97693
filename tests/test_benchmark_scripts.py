"""The benchmark scripts run end to end (tiny CPU configurations) and print their tables."""

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


def test_cost_breakdown_tiny_model():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cost_breakdown.py"), "--model", "vggish",
         "--size", "16", "--batch", "2"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    assert labels == ["forward", "gradient", "Epsilon", "EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox",
                      "EpsilonAlpha2Beta1", "DeepTaylor"]  # fmt: skip
    gradient = [cell.strip() for cell in rows[2].split("|")]
    assert [gradient[i] for i in (3, 5, 10, 13)] == ["1.00"] * 4  # ratios to itself
    flops = {row.split("|")[1].strip(): float(row.split("|")[3]) for row in rows[2:]}
    assert flops["Epsilon"] < flops["EpsilonPlus"] < flops["EpsilonAlpha2Beta1"]
