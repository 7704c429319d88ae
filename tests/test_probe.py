"""kit.probe and experiments/visualize.py: a model's attention on one text."""

import os

import jax
import numpy as np
import pytest
from helpers import load_config

from kit import probe, training

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
