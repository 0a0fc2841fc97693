"""The demo trains and explains for real (reduced budget here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxdtd.demo import run


def test_demo_trains_and_deep_taylor_is_positive_and_conservative(capsys, tmp_path):
    results = run(n_explain=64, epochs=6, verbose=True, out_dir=str(tmp_path))
    assert (tmp_path / "digits_heatmaps.png").stat().st_size > 1000
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


def test_imagenet_demo_on_a_real_photo(tmp_path, capsys):
    pytest.importorskip("skimage", reason="the ImageNet demo needs scikit-image (jaxdtd[pretrained])")
    from jaxdtd.models import efficientnet

    try:
        efficientnet._weights_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(f"pretrained weights not installed: {error}")
    from jaxdtd.demo_imagenet import run as run_imagenet

    results = run_imagenet(out_dir=tmp_path, photos=("chelsea",))
    assert results["_predictions"]["chelsea"] in {"tiger cat", "tabby", "Egyptian cat"}
    assert (tmp_path / "imagenet_heatmaps.png").stat().st_size > 10_000
    assert "EpsilonGammaBox" in capsys.readouterr().out
