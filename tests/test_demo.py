"""The demo trains and explains for real (reduced budget here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxdtd.demo import run


def test_demo_trains_explains_evaluates_and_writes_its_report(capsys, tmp_path):
    report = run(n_explain=64, epochs=6, verbose=True, out_dir=str(tmp_path))
    for name in ("heatmaps.png", "pixel_flipping.png", "report.md", "report.json"):
        assert (tmp_path / name).stat().st_size > 100
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    out = capsys.readouterr().out
    assert "test accuracy" in out and "AOPC" in out
    assert report["test_accuracy"] > 0.9
    methods = report["methods"]
    assert set(methods) == {
        "DeepTaylor (z^B, z+)", "EpsilonPlusFlat", "Sensitivity (grad^2)", "Gradient x input", "Random order"
    }  # fmt: skip
    deep_taylor = methods["DeepTaylor (z^B, z+)"]
    assert deep_taylor["positive_fraction"] == 1.0
    assert deep_taylor["conservation_error"] < 1e-2
    # sensitivity analysis is not conservative: that is the paper's point
    assert methods["Sensitivity (grad^2)"]["conservation_error"] > 0.1
    # every explanation finds pixels that matter better than a random order
    for name, m in methods.items():
        if name != "Random order":
            assert m["aopc"] > methods["Random order"]["aopc"], name
    assert "| DeepTaylor (z^B, z+) |" in (tmp_path / "report.md").read_text()


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

    results = run_imagenet(out_dir=tmp_path, photos=("chelsea",), flip_steps=6, only=("EpsilonGammaBox",))
    assert results["_predictions"]["chelsea"] in {"tiger cat", "tabby", "Egyptian cat"}
    for name in ("imagenet_heatmaps.png", "imagenet_pixel_flipping.png", "imagenet_report.md"):
        assert (tmp_path / name).stat().st_size > 200
    assert set(results["methods"]) == {"EpsilonGammaBox", "Random order"}
    assert "EpsilonGammaBox" in capsys.readouterr().out
