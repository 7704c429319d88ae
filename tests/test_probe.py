"""kit.analysis.probe and experiments/visualize.py: a model's attention on one text."""

import os

import jax
import numpy as np
import pytest
from helpers import load_config

from kit import training
from kit.analysis import probe

PRONOUN_TEXT = "Mark told Sam that he was leaving."


# optax's Adam is not strict-promotion clean: see tests/conftest.py.
pytestmark = pytest.mark.usefixtures("standard_promotion")


def untrained(task, kind):
    s = training.setup(load_config(task, **{"model.kind": kind, "model.num_layers": 2}))
    graphdef, params = training.init_model(s.mcfg, jax.random.key(0, impl="rbg"))
    return s.task, graphdef, params


@pytest.mark.parametrize(
    "task_name, kind, text, sets",
    [
        ("pronoun", "encoder_only", PRONOUN_TEXT, {"encoder": (2, 2)}),
        pytest.param(
            "dates",
            "encoder_decoder",
            "3rd of March 2021",
            {"encoder": 2, "decoder": 1, "cross": 1},
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "dates", "decoder_only", "3rd of March 2021", {"decoder": 2}, marks=pytest.mark.slow
        ),
    ],
)
def test_read_attention_gives_every_map_with_its_tokens(task_name, kind, text, sets):
    task, graphdef, params = untrained(task_name, kind)
    reading = probe.read_attention(task, graphdef, params, text)
    assert set(reading.attention) == set(sets)
    words = task.split(text)
    for name, entry in reading.attention.items():
        w = entry["weights"]
        L = sets[name][0] if isinstance(sets[name], tuple) else sets[name]
        assert w.shape == (L, 2, len(entry["query_tokens"]), len(entry["key_tokens"]))
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)  # every query row is live
        if name in ("encoder", "cross"):
            assert entry["key_tokens"] == words
    if kind == "encoder_only":
        assert len(reading.labels) == len(words)
        assert reading.prediction == " ".join(reading.labels)
    elif kind == "encoder_decoder":
        produced = reading.attention["cross"]["query_tokens"]
        assert produced[-1] == "<eos>"
        assert "".join(produced[:-1]) == reading.prediction
        # The decoder reads what it produced, shifted by one.
        assert reading.attention["decoder"]["key_tokens"] == ["<bos>", *produced[:-1]]
    else:
        read = reading.attention["decoder"]["key_tokens"]
        assert read[: len(words) + 1] == [*words, "<sep>"]
        assert "".join(read[len(words) + 1 :]) == reading.prediction


def test_text_outside_the_vocabulary_or_too_long_is_named():
    task, graphdef, params = untrained("pronoun", "encoder_only")
    with pytest.raises(ValueError, match=r"text: words \['Zed'\] are not in the pronoun"):
        probe.read_attention(task, graphdef, params, "Zed told Sam that he was leaving.")
    with pytest.raises(ValueError, match=r"text: 16 tokens, more than the 11"):
        probe.read_attention(task, graphdef, params, " ".join(["Mark"] * 16))


def test_antecedent_attention_finds_the_head_hand_case():
    tokens = ["Mark", "told", "Sam", "that", "he", "."]
    weights = np.full((2, 3, 6, 6), 1 / 6, np.float32)  # [L, N, T, S]
    weights[1, 2, 4] = [0.7, 0.1, 0.1, 0.0, 0.1, 0.0]  # layer 1 head 2: "he" -> "Mark"
    weights[0, 1, 4] = [0.5, 0.0, 0.5, 0.0, 0.0, 0.0]
    reading = probe.Reading(
        text=" ".join(tokens),
        prediction="_ _ _ _ Mark _",
        labels=["_", "_", "_", "_", "Mark", "_"],
        attention={"encoder": {"weights": weights, "query_tokens": tokens, "key_tokens": tokens}},
    )
    (a,) = probe.antecedent_attention(reading)
    assert (a.query, a.antecedent, a.key, a.best) == (4, "Mark", 0, (1, 2))
    np.testing.assert_array_equal(a.weights, weights[:, :, 4, :])
    report = probe.format_antecedent(a)
    assert "'Mark' gets the most attention from 'he' in layer 1, head 2: 0.700" in report
    assert len(report.splitlines()) == 2 + 2 * 3 + 1


def test_load_checkpoint_errors_name_the_workdir(tmp_path):
    with pytest.raises(ValueError, match=r"workdir: no config.json"):
        training.load_checkpoint(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        f.write(load_config("pronoun").to_json_best_effort())
    with pytest.raises(ValueError, match=r"workdir: no complete checkpoint"):
        training.load_checkpoint(str(tmp_path))


@pytest.mark.slow  # a fast neighbour covers the same code
def test_trained_model_loads_onto_one_device_and_reads_the_probe(tiny_run, tmp_path):
    workdir = tiny_run("pronoun")
    config, setup, state = training.load_checkpoint(workdir)
    assert config.task.name == "pronoun" and int(state["step"]) == 4
    reading = probe.read_attention(
        setup.task, setup.trainer.graphdef, state["params"], PRONOUN_TEXT
    )
    assert reading.labels is not None and len(reading.labels) == len(setup.task.split(PRONOUN_TEXT))
    paths = probe.write_views(reading, str(tmp_path / "views"))
    names = ["encoder.png", "index.html", "model.html", "neuron.html"]
    assert [os.path.basename(p) for p in paths] == names
    assert all(os.path.getsize(p) > 1000 for p in paths)


def recomputed_weights(entry):
    """softmax(q·k / sqrt(H) + bias) over the keys each query sees, in numpy float64."""
    q, k = (np.asarray(entry[f], np.float64) for f in ("query_vectors", "key_vectors"))
    logits = np.einsum("lnth,lnsh->lnts", q, k) / np.sqrt(q.shape[-1])
    logits = logits + np.asarray(entry.get("bias", 0.0), np.float64)
    if entry["causal"]:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "task_name, kind, positions, text",
    [
        ("pronoun", "encoder_only", "alibi", PRONOUN_TEXT),
        pytest.param(
            "dates", "encoder_decoder", "alibi", "3rd of March 2021", marks=pytest.mark.slow
        ),
        pytest.param("dates", "decoder_only", "rope", "3rd of March 2021", marks=pytest.mark.slow),
    ],
)
def test_read_attention_vectors_reproduce_the_weights(task_name, kind, positions, text):
    overrides = {"model.num_kv_heads": 1, "model.positions": positions}
    s = training.setup(load_config(task_name, **{"model.kind": kind, **overrides}))
    graphdef, params = training.init_model(s.mcfg, jax.random.key(0, impl="rbg"))
    reading = probe.read_attention(s.task, graphdef, params, text)
    for name, entry in reading.attention.items():
        L, N, T, S = entry["weights"].shape
        H = entry["query_vectors"].shape[-1]
        assert entry["query_vectors"].shape == (L, N, T, H)
        assert entry["key_vectors"].shape == entry["value_vectors"].shape == (L, N, S, H)
        assert entry["value_norms"].shape == (L, N, S) and (entry["value_norms"] > 0).all()
        assert entry["causal"] == (name == "decoder")
        assert ("bias" in entry) == (positions == "alibi" and name != "cross")
        # K=1: every query head reads the one key/value head.
        np.testing.assert_array_equal(entry["key_vectors"][:, 0], entry["key_vectors"][:, 1])
        np.testing.assert_allclose(recomputed_weights(entry), entry["weights"], atol=2e-6)


NAME_SWAPPED = "Mark told Anna that he was leaving."


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_compare_on_a_trained_model(tiny_run, tmp_path):
    _, setup, state = training.load_checkpoint(tiny_run("pronoun"))
    args = (setup.task, setup.trainer.graphdef, state["params"])
    comparison = probe.compare(*args, PRONOUN_TEXT, NAME_SWAPPED)
    a, b = comparison.a, comparison.b
    assert (a.text, b.text) == (PRONOUN_TEXT, NAME_SWAPPED)
    for reading in (a, b):  # each the same as reading the text alone
        alone = probe.read_attention(*args, reading.text)
        assert reading.prediction == alone.prediction
        np.testing.assert_array_equal(
            reading.attention["encoder"]["weights"], alone.attention["encoder"]["weights"]
        )
    (diff,) = comparison.differences.values()
    np.testing.assert_array_equal(
        diff, b.attention["encoder"]["weights"] - a.attention["encoder"]["weights"]
    )
    assert np.abs(diff).max() > 1e-3
    np.testing.assert_allclose(diff.sum(-1), 0.0, atol=1e-5)  # rows of both sum to 1
    # Layer 0 reads the embeddings, so only token 2 ("Sam" -> "Anna") has another query
    # and key: for every other query, the weights over the other keys keep their ratios.
    others = [i for i in range(diff.shape[-1]) if i != 2]
    wa, wb = (r.attention["encoder"]["weights"][0][:, others][:, :, others] for r in (a, b))
    np.testing.assert_allclose(
        wa / wa.sum(-1, keepdims=True), wb / wb.sum(-1, keepdims=True), rtol=1e-4
    )
    assert "srcdoc" in comparison._repr_html_()
    paths = probe.write_comparison(comparison, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["compare_encoder.png", "compare.html"]
    with open(paths[-1], encoding="utf-8") as f:
        page = f.read()
    assert '"compare": {"a": 0, "b": 1}' in page and NAME_SWAPPED in page
    fig = comparison.save_figure(tmp_path / "head.svg", layer=0, head=1)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), diff[0, 1])


def test_compare_errors_name_the_text():
    task, graphdef, params = untrained("pronoun", "encoder_only")
    with pytest.raises(ValueError, match=r"text_b: 9 tokens where text_a has 8; .* same number"):
        probe.compare(
            task, graphdef, params, PRONOUN_TEXT, "Mark told Sam that he was was leaving."
        )
    with pytest.raises(ValueError, match=r"text_a: words \['Zed'\] are not in the pronoun"):
        probe.compare(task, graphdef, params, "Zed told Sam that he was leaving.", PRONOUN_TEXT)
    with pytest.raises(ValueError, match=r"text_b: 16 tokens, more than the 11"):
        probe.compare(task, graphdef, params, PRONOUN_TEXT, " ".join(["Mark"] * 16))


@pytest.mark.slow
def test_visualize_compare_writes_the_diff_view(tiny_run, tmp_path):
    import subprocess
    import sys

    from helpers import ROOT, command_env

    def run(*flags):
        command = [sys.executable, os.path.join(ROOT, "experiments", "visualize.py"), *flags]
        return subprocess.run(
            command, capture_output=True, text=True, env=command_env(), timeout=300
        )

    workdir, out = tiny_run("pronoun"), str(tmp_path / "views")
    done = run(f"--workdir={workdir}", f"--out={out}", f"--text={PRONOUN_TEXT}",
               f"--compare={NAME_SWAPPED}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("index.html", "model.html", "neuron.html", "compare.html", "compare_encoder.png"):
        assert os.path.join(out, name) in done.stdout
        assert os.path.getsize(os.path.join(out, name)) > 1000
    assert f"compare:    {NAME_SWAPPED}" in done.stdout
    bad = run(f"--workdir={workdir}", f"--out={out}", f"--text={PRONOUN_TEXT}", "--compare=Mark")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        "error: compare: 1 tokens where text has 8; the texts must have the same number "
        "of tokens so that positions align"
    ]
