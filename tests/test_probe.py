"""kit.probe and experiments/visualize.py: a model's attention on one text."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kit import probe, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRONOUN_TEXT = "Mark told Sam that he was leaving."


@pytest.fixture(autouse=True)
def standard_promotion():
    # optax's Adam is not strict-promotion clean (see test_train.py).
    with jax.numpy_dtype_promotion("standard"):
        yield


def tiny_config(task, kind):
    config = train.default_config()
    config.task.name = task
    config.task.eval_size = 8
    config.model.update(
        {"kind": kind, "d_model": 16, "num_heads": 2, "num_layers": 2, "d_ff": 32, "max_len": 48}
    )
    config.model.num_decoder_layers = 1
    config.train.update(
        {"steps": 2, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 8, "log_every": 1}
    )
    config.mesh.update({"data": 1, "model": 1})
    return config


def untrained(task, kind):
    s = train.setup(tiny_config(task, kind), jax.devices()[:1])
    graphdef, params = train.init_model(s.mcfg, jax.random.key(0, impl="rbg"))
    return s.task, graphdef, params


@pytest.mark.parametrize(
    "task_name, kind, text, sets",
    [
        ("pronoun", "encoder_only", PRONOUN_TEXT, {"encoder": (2, 2)}),
        ("dates", "encoder_decoder", "3rd of March 2021", {"encoder": 2, "decoder": 1, "cross": 1}),
        ("dates", "decoder_only", "3rd of March 2021", {"decoder": 2}),
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
        train.load_checkpoint(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        f.write(tiny_config("pronoun", "encoder_only").to_json_best_effort())
    with pytest.raises(ValueError, match=r"workdir: no complete checkpoint"):
        train.load_checkpoint(str(tmp_path))


def test_visualize_command_writes_views(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(
        tiny_config("pronoun", "encoder_only"), workdir, progress=False, devices=jax.devices()[:1]
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    command = [sys.executable, os.path.join(ROOT, "experiments", "visualize.py")]
    done = subprocess.run(
        [*command, f"--workdir={workdir}", f"--text={PRONOUN_TEXT}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prediction: " in done.stdout
    for name in ("encoder.png", "index.html"):
        path = os.path.join(workdir, "attention", name)
        assert os.path.getsize(path) > 1000
        assert path in done.stdout
    bad = subprocess.run(
        [*command, f"--workdir={workdir}", "--text=Zed told Sam that he was leaving."],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "words ['Zed'] are not in the pronoun vocabulary" in bad.stderr
