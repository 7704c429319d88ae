"""Hook points (kit.hooks) and activation patching (kit.analysis.patching), against hand-computed
forwards, jax.nn and models whose answer is known by construction."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, command_env, jitted, normal, tiny_model

from kit import tasks
from kit.analysis import patching
from kit.hooks import Edit, Hooks


def build(kind, **overrides):
    return tiny_model(kind, **overrides)


def tokens(B=3, T=6, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(4, 12, size=(B, T)).astype(np.int32))


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_every_point_is_read_with_its_shape():
    model = build("encoder_decoder", num_kv_heads=1)
    src = tokens()
    lengths = jnp.array([6, 4, 5], jnp.int32)
    tgt = src[:, :5]
    logits, aux = jitted(model, lambda m: m(src, lengths, tgt, hooks=Hooks(read="*")))
    cache = aux["activations"]
    points = model.hook_points()
    # "bias" is read only where positions are a score function; sinusoidal has none.
    assert set(cache) == {p for p in points if not p.endswith(".bias")}
    assert len(points) == 2 * (1 + 8 + 3) + 2 * (1 + 16 + 3)
    assert cache["encoder.1.attn.q"].shape == (3, 6, 2, 8)
    assert cache["encoder.1.attn.k"].shape == (3, 6, 1, 8)  # one key/value head
    assert cache["decoder.0.cross.weights"].shape == (3, 2, 5, 6)
    assert cache["decoder.0.attn.heads"].shape == (3, 5, 2, 8)
    assert cache["decoder.1.mlp_out"].shape == (3, 5, 16)
    # The last block's output, through the final norm and the head, is the logits.
    x = model.decoder.norm(cache["decoder.1.resid_post"])
    np.testing.assert_allclose(model.head(x), logits, rtol=1e-6, atol=1e-6)


def test_read_points_agree_with_the_formula():
    """weights == softmax(scores) over the live keys, scores == q k / sqrt(H) (RoPE
    applied), heads == weights v, out == heads W_O + b: the points are what the
    forward computed."""
    model = build("decoder_only", positions="rope")
    x = tokens(B=2, T=5)
    key_mask = jnp.array([[True] * 5, [False, True, True, True, True]])
    _, aux = jitted(model, lambda m: m(x, key_mask, hooks=Hooks(read="decoder.1.attn.*")))
    c = {k.split(".")[-1]: np.asarray(v, np.float64) for k, v in aux["activations"].items()}
    q, k, v = c["q"], c["k"], c["v"]
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    np.testing.assert_allclose(c["scores"], scores, rtol=1e-5, atol=1e-5)
    live = np.tril(np.ones((5, 5), bool))[None, None] & np.asarray(key_mask)[:, None, None, :]
    expected = np.asarray(jax.nn.softmax(jnp.where(live, scores, -np.inf), axis=-1))
    expected = np.where(live.any(-1, keepdims=True), expected, 0.0)  # a row with no key: 0
    np.testing.assert_allclose(c["weights"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        c["heads"], np.einsum("bnts,bsnh->btnh", c["weights"], v), rtol=1e-5, atol=1e-6
    )
    attn = model.decoder.layers[1].self_attention
    kernel = np.asarray(attn.out["kernel"][...], np.float64)
    out = np.einsum("btnh,nhd->btd", c["heads"], kernel) + np.asarray(attn.out["bias"][...])
    np.testing.assert_allclose(c["out"], out, rtol=1e-5, atol=1e-5)


def test_writes_replace_add_zero_and_mean():
    model = build("encoder_only")
    src = tokens()
    lengths = jnp.array([6, 6, 6], jnp.int32)
    point = "encoder.0.resid_post"
    _, aux = jitted(model, lambda m: m(src, lengths, hooks=Hooks(read=point)))
    x = aux["activations"][point]
    fixed = normal(jax.random.key(3), x.shape)
    where = jnp.zeros((1, 6, 1)).at[0, 2, 0].set(1.0)  # position 2 only
    cases = {
        "replace": (Edit("replace", fixed), fixed),
        "add": (Edit("add", fixed), x + fixed),
        "zero": (Edit("zero"), jnp.zeros_like(x)),
        "mean": (Edit("mean"), jnp.broadcast_to(x.mean(0), x.shape)),
        "where": (Edit("replace", fixed, where=where), x.at[:, 2].set(fixed[:, 2])),
    }

    for name, (edit, expected) in cases.items():
        _, aux = model(src, lengths, hooks=Hooks(read=point, write={point: edit}))
        np.testing.assert_allclose(aux["activations"][point], expected, atol=1e-6, err_msg=name)
    # The logits follow what was written: the rest of the forward reads it.
    logits, _ = model(src, lengths, hooks=Hooks(write={point: Edit("replace", fixed)}))
    layer = model.encoder.layers[1]
    h = layer.self_attention(layer.norm_self(fixed), key_value_seq_lengths=lengths)
    y = fixed + h
    y = y + layer.feed_forward(layer.norm_ff(y))
    np.testing.assert_allclose(logits, model.head(model.encoder.norm(y)), rtol=1e-5, atol=1e-5)


def test_writing_weights_changes_the_output_as_the_formula_says():
    """Uniform weights over all keys: each head's output is the mean of its values."""
    model = build("encoder_only", num_layers=1)
    src = tokens(B=2, T=4)
    lengths = jnp.array([4, 4], jnp.int32)
    uniform = jnp.full((2, 2, 4, 4), 0.25)
    hooks = Hooks(
        read=("*.v", "*.heads"), write={"encoder.0.attn.weights": Edit("replace", uniform)}
    )
    _, aux = jitted(model, lambda m: m(src, lengths, hooks=hooks))
    c = aux["activations"]
    mean_v = jnp.broadcast_to(c["encoder.0.attn.v"].mean(1, keepdims=True), (2, 4, 2, 8))
    np.testing.assert_allclose(c["encoder.0.attn.heads"], mean_v, rtol=1e-5, atol=1e-6)


def test_no_write_is_bit_for_bit_and_hooks_do_not_recompile():
    model = build("encoder_only")
    graphdef, params = nnx.split(model)
    src = tokens()
    lengths = jnp.array([6, 4, 5], jnp.int32)
    traces = []

    @jax.jit
    def run(p, hooks):
        traces.append(1)
        return nnx.merge(graphdef, p)(src, lengths, hooks=hooks)[0]

    point = "encoder.1.attn.heads"
    keep = run(params, Hooks(write={point: Edit("zero", where=jnp.zeros((1, 1, 2, 1)))}))
    drop = run(params, Hooks(write={point: Edit("zero", where=jnp.ones((1, 1, 2, 1)))}))
    assert len(traces) == 1
    plain = jax.jit(lambda p: nnx.merge(graphdef, p)(src, lengths)[0])(params)
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(plain))
    assert not np.allclose(np.asarray(drop), np.asarray(plain), atol=1e-4)


@pytest.mark.parametrize(
    "hooks, match",
    [
        (Hooks(write={"encoder.9.resid_pre": Edit("zero")}), r"^hooks.write: unknown hook point"),
        (Hooks(read="decoder.*"), r"^hooks.read: 'decoder.\*' matches no hook point"),
        (Hooks(write={"encoder.0.attn.bias": Edit("zero")}), r"^hooks.write: .* is read only"),
        (
            Hooks(write={"encoder.0.resid_pre": Edit("replace", jnp.zeros((3, 5, 16)))}),
            r"^encoder.0.resid_pre: value: shape \(3, 5, 16\) does not broadcast",
        ),
        ({"encoder.0.resid_pre": Edit("zero")}, r"^hooks: expected a kit.hooks.Hooks"),
    ],
)
def test_bad_hooks_are_named(hooks, match):
    model = build("encoder_only")
    with pytest.raises(ValueError, match=match):
        model(tokens(), jnp.array([6, 6, 6], jnp.int32), hooks=hooks)


def test_bad_edits_are_named():
    with pytest.raises(ValueError, match=r"^op: expected one of"):
        Edit("swap")
    with pytest.raises(ValueError, match=r"^value: op 'replace' needs a value"):
        Edit("replace")
    with pytest.raises(ValueError, match=r"^value: op 'zero' takes no value"):
        Edit("zero", jnp.ones(3))
    with pytest.raises(ValueError, match=r"^write\['a'\]: expected an Edit"):
        Hooks(write={"a": 1.0})


# ---------------------------------------------------------------------------
# Activation patching.


def one_layer_model():
    """One attention-only layer, 2 heads. Head 1 reads nothing (its value kernel is
    zero), so only head 0 can carry position 0's token to the last position."""
    model = build("encoder_only", num_layers=1, feed_forward=False, d_model=16, num_heads=2)
    attn = model.encoder.layers[0].self_attention
    attn.value["kernel"][...] = attn.value["kernel"][...].at[:, 1].set(0.0)
    return model


def corrupted_pair():
    clean = jnp.array([[4, 7, 8, 9, 10]], jnp.int32)
    corrupt = clean.at[0, 0].set(5)  # differs at position 0 only
    return clean, corrupt


def test_patching_a_hand_built_model_finds_the_head_and_the_position():
    model = one_layer_model()
    clean, corrupt = corrupted_pair()
    lengths = jnp.array([5], jnp.int32)
    c_logits, c_cache = patching.run_with_cache(
        lambda h: model(clean, lengths, hooks=h), ["*.heads", "*.resid_pre"]
    )
    r_logits, _ = model(corrupt, lengths)
    right, wrong = 6, 11
    metric = patching.logit_difference(4, right, wrong)
    m_clean, m_corrupt = float(metric(c_logits)), float(metric(r_logits))
    assert m_clean != m_corrupt

    def forward(hooks):
        return model(corrupt, lengths, hooks=hooks)[0]

    heads = patching.patch_heads(forward, metric, c_cache, ["encoder.0.attn.heads"])
    np.testing.assert_allclose(
        patching.normalized(heads, m_clean, m_corrupt), [[1.0, 0.0]], atol=1e-4
    )
    positions = patching.patch_positions(forward, metric, c_cache, ["encoder.0.resid_pre"])
    np.testing.assert_allclose(
        patching.normalized(positions, m_clean, m_corrupt), [[1, 0, 0, 0, 0]], atol=1e-4
    )


def test_patching_everything_gives_the_clean_metric_and_nothing_the_corrupt_one():
    model = build("encoder_only")  # two layers with feed-forwards
    clean, corrupt = corrupted_pair()
    lengths = jnp.array([5], jnp.int32)
    c_logits, cache = patching.run_with_cache(lambda h: model(clean, lengths, hooks=h), ["*"])
    r_logits, _ = model(corrupt, lengths)
    metric = patching.logit_difference(0, 6, 11)  # position 0 holds the changed token

    def forward(hooks):
        return model(corrupt, lengths, hooks=hooks)[0]

    point = "encoder.0.resid_pre"
    every, none = jnp.ones((1, 1, 5, 1)), jnp.zeros((1, 1, 5, 1))
    got = patching.patch(forward, metric, point, cache[point], jnp.concatenate([every, none]))
    np.testing.assert_allclose(got, [metric(c_logits), metric(r_logits)], rtol=1e-6, atol=1e-6)
    # Every head of every layer patched at once: the attention outputs are the clean
    # ones, but the residual stream still carries the corrupted token: not the clean metric.
    write = {
        p: Edit("replace", cache[p], where=jnp.ones(()))
        for p in model.hook_points()
        if p.endswith(".heads")
    }
    assert len(write) == 2
    patched = metric(forward(Hooks(write=write)))
    assert float(patched) != pytest.approx(float(metric(c_logits)))


def _attention_output_patching():
    """A one-layer attention-only model's clean and corrupted caches, its heads as the
    patched point, the corrupted run's attention output as `forward(hooks)`, and the
    linear metric o · d at position 4 (the output is linear in the heads)."""
    model = build("encoder_only", num_layers=1, feed_forward=False)
    clean, corrupt = corrupted_pair()
    lengths = jnp.array([5], jnp.int32)
    _, c_cache = patching.run_with_cache(lambda h: model(clean, lengths, hooks=h), ["*"])
    _, r_cache = patching.run_with_cache(lambda h: model(corrupt, lengths, hooks=h), ["*"])
    direction = normal(jax.random.key(1), (16,))

    def forward(hooks):  # the attention output, read through a hook
        _, aux = model(corrupt, lengths, hooks=hooks | Hooks(read="encoder.0.attn.out"))
        return aux["activations"]["encoder.0.attn.out"]

    def linear(out):
        return out[0, 4] @ direction

    return c_cache, r_cache, ["encoder.0.attn.heads"], forward, linear


def test_attribution_patching_is_exact_where_the_metric_is_linear():
    """The metric read straight off the last layer's attention output (linear in its
    heads): the attribution equals the patching effect, head by head."""
    c_cache, r_cache, points, forward, metric = _attention_output_patching()

    base = float(metric(r_cache["encoder.0.attn.out"]))
    effect = patching.patch_heads(forward, metric, c_cache, points) - base
    estimate = patching.attribution_patching(forward, metric, c_cache, r_cache, points, keep=2)
    np.testing.assert_allclose(estimate, effect, rtol=1e-4, atol=1e-5)
    assert np.abs(effect).max() > 1e-3


def test_attribution_patching_takes_the_gradient_at_the_corrupted_run():
    """A quadratic metric m(o) = (o · d)^2 of the attention output o, which is linear
    in the heads: patching head n moves o · d by L_n (the linear metric's effect), so
    by hand the attribution (the gradient at the corrupted run o_r) is 2 (o_r · d) L_n
    and the patching effect is that plus L_n^2. A gradient taken at the clean run
    would give 2 (o_c · d) L_n instead."""
    c_cache, r_cache, points, forward, linear = _attention_output_patching()

    def quadratic(out):
        return linear(out) ** 2

    o_r = float(linear(r_cache["encoder.0.attn.out"]))
    o_c = float(linear(c_cache["encoder.0.attn.out"]))
    moves = patching.patch_heads(forward, linear, c_cache, points) - o_r  # L_n, [1, N]
    estimate = patching.attribution_patching(forward, quadratic, c_cache, r_cache, points, keep=2)
    effect = patching.patch_heads(forward, quadratic, c_cache, points) - o_r**2
    np.testing.assert_allclose(estimate, 2 * o_r * moves, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(effect, estimate + moves**2, rtol=1e-4, atol=1e-5)
    # the check can tell the two runs' gradients apart
    assert np.abs(2 * o_c * moves - 2 * o_r * moves).max() > 1e-2


def test_patching_errors_are_named():
    with pytest.raises(ValueError, match=r"^points: \['x'\] not in the cache"):
        patching.patch_heads(lambda h: None, lambda y: y, {}, ["x"])
    with pytest.raises(ValueError, match=r"^clean, corrupt: the two runs give the same"):
        patching.normalized([1.0], 2.0, 2.0)


@pytest.mark.slow  # a fast neighbour covers the same code
def test_patch_text_finds_the_one_position_that_differs():
    """he -> she changes one token: patching the residual stream there before layer 0
    brings the whole clean run back (1), anywhere else nothing (0), in any model."""
    task = tasks.make_task("pronoun")
    model = build("encoder_only", vocab_size=len(task.vocab), max_len=task.src_len)
    clean, corrupt = "Mark told Mary that he was leaving .", "Mark told Mary that she was leaving ."
    result = patching.patch_text(model, task, clean, corrupt, 4, answers=("Mark", "Mary"))
    assert result.heads.shape == result.heads_attribution.shape == (2, 2)
    assert result.positions.shape == (2, 8)
    np.testing.assert_allclose(result.positions[0], np.eye(8)[4], atol=1e-4)
    assert result.corrupt_tokens[4] == "she" and result.right == "Mark"
    assert set(result.to_json()["correlation"]) == {"heads", "positions"}
    with pytest.raises(ValueError, match=r"^corrupt: 9 tokens, but clean has 8"):
        patching.patch_text(model, task, clean, corrupt + " .", 4, ("Mark", "Mary"))
    with pytest.raises(ValueError, match=r"^answers: \['Zed'\] not in the pronoun"):
        patching.patch_text(model, task, clean, corrupt, 4, ("Mark", "Zed"))
    with pytest.raises(ValueError, match=r"^position: expected an int in \[0, 8\)"):
        patching.patch_text(model, task, clean, corrupt, 8, ("Mark", "Mary"))


@pytest.mark.slow
def test_patch_command_writes_its_report(tiny_run, tmp_path):
    workdir = tiny_run("pronoun")
    out = tmp_path / "patch"
    args = [
        f"--workdir={workdir}",
        "--clean=Mark told Mary that he was leaving .",
        "--corrupt=Mark told Mary that she was leaving .",
        "--position=4",
    ]
    script = [sys.executable, os.path.join(ROOT, "experiments", "patch.py")]
    done = subprocess.run(
        [*script, *args, "--answers=Mark,Mary", f"--out={out}"],
        env=command_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "patching.json").read_text())
    np.testing.assert_allclose(report["positions"][0], np.eye(8)[4], atol=1e-4)
    assert (out / "patching.png").stat().st_size > 10_000
    page = (out / "index.html").read_text()
    data = re.search(r'id="attention-data">(.*?)</script>', page).group(1)
    shown = json.loads(data)
    assert shown["start"]["view"] == "patching" and len(shown["examples"]) == 2
    np.testing.assert_allclose(shown["patching"]["heads"], report["heads"])
    bad = subprocess.run(
        [*script, *args, "--answers=Mark", f"--out={tmp_path / 'bad'}"],
        env=command_env(),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "answers: expected RIGHT,WRONG" in bad.stderr
    assert not (tmp_path / "bad").exists()
