"""The digits task, the Vision Transformer and its class-token views."""

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import load_config, slow_beyond

from kit import digits, metrics, models, tasks, training
from kit.analysis import probe
from kit.hooks import Hooks
from kit.models.vision import patchify
from kit.views import patches

pytestmark = pytest.mark.usefixtures("standard_promotion")


def test_split_is_stratified_disjoint_complete_and_fixed():
    images, labels = digits.load()
    assert images.shape == (1797, 8, 8) and images.min() == 0.0 and images.max() == 1.0
    train, held_out = digits.split()
    assert (len(train), len(held_out)) == (1437, 360)
    assert not set(train) & set(held_out)
    assert sorted([*train, *held_out]) == list(range(1797))
    for c in range(10):  # 20% of every class, to within one image
        in_class = np.sum(labels == c)
        assert abs(np.sum(labels[held_out] == c) - 0.2 * in_class) <= 1
    digits.split.cache_clear()
    again = digits.split()
    np.testing.assert_array_equal(again[1], held_out)


def test_shift_moves_by_one_pixel_and_fills_zeros():
    image = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3)
    down_right = digits.shift(image, np.array([1]), np.array([1]))[0]
    np.testing.assert_array_equal(down_right, [[0, 0, 0], [0, 1, 2], [0, 4, 5]])
    up_left = digits.shift(image, np.array([-1]), np.array([-1]))[0]
    np.testing.assert_array_equal(up_left, [[5, 6, 0], [8, 9, 0], [0, 0, 0]])


def test_batches_are_a_pure_function_of_seed_and_step_and_augmentation_switches_off():
    task = tasks.make_task("digits", augment=False)
    a, b = task.train_batch(3, 7, 16), task.train_batch(3, 7, 16)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(a["images"], task.train_batch(3, 8, 16)["images"])
    images, labels = digits.load()
    train = set(digits.split()[0].tolist())
    for image, label in zip(a["images"], a["labels"], strict=True):  # untouched training images
        match = [i for i in train if np.array_equal(images[i], image)]
        assert match and labels[match[0]] == label
    shifted = tasks.make_task("digits").train_batch(3, 7, 16)
    assert not np.array_equal(shifted["images"], a["images"])
    np.testing.assert_array_equal(shifted["labels"], a["labels"])  # the same images, moved


def test_patchify_hand_made_image():
    image = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8)
    patches = patchify(image, 2)
    assert patches.shape == (1, 16, 4)
    np.testing.assert_array_equal(patches[0, 0], [0, 1, 8, 9])
    np.testing.assert_array_equal(patches[0, 1], [2, 3, 10, 11])
    np.testing.assert_array_equal(patches[0, 4], [16, 17, 24, 25])  # second row of patches
    np.testing.assert_array_equal(
        patchify(image, 4)[0, 3], [36, 37, 38, 39, 44, 45, 46, 47, 52, 53, 54, 55, 60, 61, 62, 63]
    )
    with pytest.raises(ValueError, match=r"patch_size: must divide the image size 8x8, got 3"):
        patchify(image, 3)


@pytest.mark.parametrize("positions", slow_beyond(["sinusoidal", "learned"], ["learned"]))
def test_class_token_attention_rows_sum_to_one(positions):
    config = load_config("digits", **{"model.positions": positions, "model.num_layers": 2})
    s = training.setup(config)
    graphdef, params = training.init_model(s.mcfg, jax.random.key(0, impl="rbg"))
    images = jnp.asarray(digits.eval_set()["images"][:3])
    read = Hooks(read="encoder.*.attn.weights")
    logits, aux = jax.jit(lambda p: nnx.merge(graphdef, p)(images, hooks=read))(params)
    assert logits.shape == (3, 10)
    weights = np.stack([aux["activations"][f"encoder.{i}.attn.weights"] for i in range(2)])
    assert weights.shape == (2, 3, 2, 17, 17)  # [L, B, N, T, T]
    np.testing.assert_allclose(weights[:, :, :, 0].sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow  # a fast neighbour covers the same code
def test_tiny_digits_run_evaluates_the_whole_split(tiny_run):
    workdir = tiny_run("digits")
    lines = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    evals = [line for line in lines if "eval/accuracy" in line]
    assert [line["step"] for line in evals] == [2, 4]
    for line in evals:  # one class per image: all three accuracies agree
        assert line["eval/accuracy"] == line["eval/exact_match"] == line["eval/token_accuracy"]
        assert round(line["eval/accuracy"] * 360) == pytest.approx(line["eval/accuracy"] * 360)
        assert np.isfinite(line["eval/loss"])


@pytest.mark.slow  # the inner loop keeps a cheaper check of the same contract
def test_views_of_a_trained_model_and_their_errors(tiny_run, tmp_path):
    _, setup, state = training.load_checkpoint(tiny_run("digits"))
    reading = probe.read_image(setup.task, setup.trainer.graphdef, state["params"], 5)
    assert reading.label == setup.task.vocab[int(digits.eval_set()["labels"][5])]
    assert reading.weights.shape == (1, 2, 17, 17)
    paths = probe.write_image_views(reading, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["image_5.png", "index.html"]
    page = pathlib.Path(paths[1]).read_text()
    assert "data:image/png;base64," in page and "http" not in page
    with pytest.raises(ValueError, match=r"image: expected an index in \[0, 360\)"):
        probe.read_image(setup.task, setup.trainer.graphdef, state["params"], 360)
    text_task = tasks.make_task("copy")
    graphdef, params = training.init_model(
        models.ModelConfig(kind="encoder_only", vocab_size=text_task.vocab_size),
        jax.random.key(0, impl="rbg"),
    )
    with pytest.raises(ValueError, match=r"image: class-token maps need a vision_transformer"):
        probe.read_image(text_task, graphdef, params, 0)


def test_overlay_lights_the_patch_hand_case(tmp_path):
    weights = np.zeros(16)
    weights[5] = 1.0  # patch row 1, column 1 of a 4 x 4 grid: pixels [2:4, 2:4]
    pixels = patches.patch_map(weights, 2, 8)
    expected = np.zeros((8, 8))
    expected[2:4, 2:4] = 1.0
    np.testing.assert_array_equal(pixels, expected)
    with pytest.raises(ValueError, match=r"weights: expected one per patch, shape \(16,\)"):
        patches.patch_map(np.zeros(15), 2, 8)
    with pytest.raises(ValueError, match=r"patch_size: must divide the image size 8, got 3"):
        patches.patch_map(np.zeros(4), 3, 8)
    attention = np.full((2, 1, 17, 17), 1 / 17)  # [L, N, T, T]
    attention[1, 0, 0] = np.eye(17)[6]  # layer 1: the class token looks at patch 5 only
    heads, rollout = patches.class_token_maps(attention)
    np.testing.assert_array_equal(heads[1, 0], weights)
    assert heads.shape == (2, 1, 16) and rollout.shape == (16,)
    figure = patches.plot_patch_attention(
        np.ones((8, 8)), attention, 2, path=str(tmp_path / "a.png")
    )
    assert len(figure.axes) == 2 * 2 and (tmp_path / "a.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.patch_size": 3}, r"config\.model\.patch_size: must divide the image size 8"),
        ({"model.positions": "rope"}, r"config\.model\.positions: a vision_transformer takes"),
        ({"model.kind": "encoder_only"}, r"config\.model\.kind: task 'digits' is images"),
    ],
)
def test_bad_vision_configs_fail_at_start_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training.train_and_evaluate(load_config("digits", **overrides), str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_text_task_refuses_the_vision_transformer():
    config = load_config("copy", **{"model.kind": "vision_transformer"})
    with pytest.raises(ValueError, match=r"config\.model\.kind: 'vision_transformer' reads images"):
        training.check_config(config)


def test_without_scikit_learn_the_task_names_the_extra(monkeypatch):
    digits.load.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    try:
        with pytest.raises(ValueError, match=r"task.name: .*pip install -e '.\[vision\]'"):
            training.check_config(load_config("digits"))
    finally:
        digits.load.cache_clear()
