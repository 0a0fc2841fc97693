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
    for program in ("gradient", "EpsilonGammaBox"):
        assert f"| {program} |" in text
    assert "| EpsilonPlusFlat |" not in text  # --presets: the tiny run times one of them
    # benchmarks/long_prompts.py --tiny (a 2-layer Llama) in bfloat16
    assert "**tiny Llama (2 layers, hidden 32), random init, logits of the last position**" in text
    assert "prompt of 16 tokens, bfloat16, batch 1" in text
    llm = text[text.index("**tiny Llama") :]
    rows = [line for line in llm.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["forward", "gradient", "AttnLRP", "CPLRP"]
    for row in rows[1:]:
        assert all(float(cell) >= 0 for cell in row.split("|")[2:-1])  # numbers, no nan
    assert llm.count(" vs the gradient: time ") == 2


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


def test_transformers_script_tiny_random_init():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "transformer_models.py"), "--tiny"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "**minilm** (tiny BERT (2 layers, hidden 32, 4 heads), random init" in out
    assert "sequence 8, float32, batch 2" in out
    assert "**vit** (ViT (patch 4, hidden 32, 2 layers" in out and "16x16x3, float32, batch 2" in out
    blocks = out.split("**")[1:]
    tables = [[line for line in text.splitlines() if line.startswith("| ")] for text in blocks[1::2]]
    assert len(tables) == 2
    for rows in tables:
        assert [row.split("|")[1].strip() for row in rows[1:]] == ["forward", "gradient", "AttnLRP", "CPLRP"]
        gradient = [cell.strip() for cell in rows[2].split("|")[1:-1]]
        assert len(gradient) == 15
        assert [gradient[i] for i in (4, 6, 8, 10, 12, 14)] == ["1.00"] * 6  # ratios to itself
        for row in rows[1:]:
            assert all(float(cell) >= 0 for cell in row.split("|")[2:-1])  # numbers, no nan
    for composite in ("AttnLRP", "CPLRP"):
        assert out.count(f"- {composite} vs the gradient: time ") == 2


def test_concepts_similarity_script_tiny():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "concepts_similarity.py"), "--tiny", "--repeats", "1"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "**Concept atlas**: 256 digits, batches of 128, untrained DigitsCNN" in out
    assert "**BiLRP**: tiny BERT (2 layers, hidden 32), random init, a pair of 5 and 6 tokens" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| program")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "256 gradients (input, label logit)", "concept atlas",
        "2 x 32 gradients, combined the same way", "BiLRP",
    ]  # fmt: skip
    assert all(float(row.split("|")[2]) > 0 and float(row.split("|")[3]) > 0 for row in rows)
