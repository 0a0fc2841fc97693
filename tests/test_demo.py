"""The demo trains and explains for real (reduced budget here)."""

from __future__ import annotations

import subprocess
import sys

from jaxdtd.demo import run


def test_demo_trains_and_deep_taylor_is_positive_and_conservative(capsys):
    results = run(n_explain=64, epochs=6, verbose=True)
    out = capsys.readouterr().out
    assert "test accuracy" in out and "DeepTaylor" in out
    assert results["_model"]["test_accuracy"] > 0.9
    deep_taylor = results["DeepTaylor (z^B, z+)"]
    assert deep_taylor["positive_fraction"] == 1.0
    assert deep_taylor["conservation_error"] < 1e-2
    # sensitivity analysis is not conservative: that is the paper's point
    assert results["Sensitivity (grad^2)"]["conservation_error"] > 0.1


def test_cli_help():
    done = subprocess.run([sys.executable, "-m", "jaxdtd", "demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--epochs" in done.stdout
