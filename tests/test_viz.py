"""kit.viz: heatmaps, the offline HTML viewer (also driven in Chromium), attention rollout."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from kit import viz


def softmax_weights(shape, seed=0):
    logits = 2.0 * np.random.default_rng(seed).normal(size=shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def tokens(n, prefix):
    return [f"{prefix}{i}" for i in range(n)]


def tick_texts(labels):
    return [t.get_text() for t in labels]


# --------------------------------------------------------------------------
# plot_attention


@pytest.mark.parametrize("L, N, T, S", [(2, 3, 5, 5), (1, 2, 4, 7)])  # self, cross
def test_plot_attention_grid_of_layers_and_heads(L, N, T, S):
    query, key = tokens(T, "q"), tokens(S, "k")
    fig = viz.plot_attention(softmax_weights((L, N, T, S)), query, key, title="t")
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == L * N
    assert len(fig.axes) == L * N + 1  # one shared colour bar
    assert heatmaps[N + 1 if L > 1 else 1].get_title() == (
        "layer 1 / head 1" if L > 1 else "layer 0 / head 1"
    )
    bottom_left = heatmaps[(L - 1) * N]
    assert tick_texts(bottom_left.get_yticklabels()) == query
    assert tick_texts(bottom_left.get_xticklabels()) == key
    assert bottom_left.images[0].get_array().shape == (T, S)
    assert fig.get_figwidth() <= 24 and fig.get_figheight() <= 24


@pytest.mark.parametrize("shape, count", [((3, 4), 1), ((2, 3, 4), 2)])
def test_plot_attention_one_head_and_one_layer(shape, count):
    fig = viz.plot_attention(jnp.asarray(softmax_weights(shape)), list("abc"), list("wxyz"))
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == count
    assert heatmaps[-1].get_title() == ("head 1" if count == 2 else "")


def test_plot_attention_labels_whitespace_tokens_visibly():
    fig = viz.plot_attention(softmax_weights((3, 3)), list("a b"), ["a", "\n", "b"])
    ax = fig.axes[0]
    assert tick_texts(ax.get_yticklabels()) == ["a", "␣", "b"]
    assert tick_texts(ax.get_xticklabels()) == ["a", "\\n", "b"]


@pytest.mark.parametrize("suffix, signature", [(".png", b"\x89PNG\r\n\x1a\n"), (".svg", b"<svg")])
def test_plot_attention_saves_by_suffix(tmp_path, suffix, signature):
    path = tmp_path / f"attention{suffix}"
    viz.plot_attention(softmax_weights((2, 3, 3)), list("abc"), list("abc"), path=path)
    data = path.read_bytes()
    assert data
    assert signature in data[:400]


@pytest.mark.parametrize(
    "shape, query, key, kwargs, match",
    [
        ((2, 1, 2, 3, 3), "abc", "abc", {}, r"weights: expected rank 2.*given rank 5.*batch"),
        ((3,), "abc", "abc", {}, r"weights: expected rank 2.*given rank 1"),
        ((2, 3, 4), "ab", "abcd", {}, r"query_tokens: expected T=3 tokens.*given 2"),
        ((2, 3, 4), "abc", "abc", {}, r"key_tokens: expected S=4 tokens.*given 3"),
        ((2, 2, 2, 2), "ab", "ab", {"layer_names": ["x"]}, r"layer_names: expected L=2.*given 1"),
        ((2, 2), "ab", "ab", {"path": "attention.jpg"}, r"path: expected .*\.png or \.svg"),
    ],
)
def test_plot_attention_rejects_bad_input(shape, query, key, kwargs, match):
    with pytest.raises(ValueError, match=match):
        viz.plot_attention(np.ones(shape), query, key, **kwargs)


# --------------------------------------------------------------------------
# attention_html


def make_examples(kind, batch=3, L=2, N=3, T=4, S=6):
    """`batch` examples with one attention set: "self" ([L, N, T, T]) or "cross" ([L, N, T, S])."""
    S = T if kind == "self" else S
    return [
        {
            "name": f"ex{b}",
            "attention": {
                kind: {
                    "weights": softmax_weights((L, N, T, S), seed=b),
                    "query_tokens": tokens(T, f"q{b}_"),
                    "key_tokens": tokens(S, f"k{b}_") if kind == "cross" else tokens(T, f"q{b}_"),
                }
            },
        }
        for b in range(batch)
    ]


def embedded_data(page):
    block = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', page)
    return json.loads(block.group(1))


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_attention_html_is_self_contained(kind):
    examples = make_examples(kind)
    page = viz.attention_html(examples, title="dates")
    lowered = page.lower()
    for reference in ("http://", "https://", "//cdn", "<script src", "<link", "@import", "url("):
        assert reference not in lowered
    assert lowered.count("<script") == 2  # the data block and the inline viewer
    assert "<title>dates</title>" in page
    data = embedded_data(page)
    assert [e["name"] for e in data["examples"]] == ["ex0", "ex1", "ex2"]
    for example, embedded in zip(examples, data["examples"], strict=True):
        (entry,) = example["attention"].values()
        (got,) = embedded["sets"]
        assert got["name"] == kind
        assert got["query_tokens"] == entry["query_tokens"]
        assert got["key_tokens"] == entry["key_tokens"]
        np.testing.assert_array_equal(got["weights"], np.round(entry["weights"], 4))


def test_attention_html_escapes_token_text_and_title(tmp_path):
    evil = "</script><b>"
    examples = [
        {
            "attention": {
                "self": {
                    "weights": np.eye(2),
                    "query_tokens": [evil, "x"],
                    "key_tokens": [evil, "x"],
                }
            }
        }
    ]
    page = viz.attention_html(examples, title="<i>t</i>")
    assert evil not in page
    assert "<b>" not in page and "<i>" not in page
    assert "&lt;i&gt;t&lt;/i&gt;" in page
    data = embedded_data(page)
    assert data["examples"][0]["name"] == "example 0"
    assert data["examples"][0]["sets"][0]["query_tokens"] == [evil, "x"]
    path = tmp_path / "a.html"
    viz.write_attention_html(path, examples, title="<i>t</i>")
    assert path.read_text(encoding="utf-8") == page


def _set_field(field, value):
    def edit(examples):
        examples[1]["attention"]["cross"][field] = value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            _set_field("query_tokens", ["a"]),
            r"examples\[1\] \('ex1'\), set 'cross': query_tokens: "
            r"expected T=4 tokens.*given 1",
        ),
        (
            _set_field("key_tokens", "abc"),
            r"examples\[1\] \('ex1'\), set 'cross': key_tokens: "
            r"expected S=6 tokens.*given 3",
        ),
        (_set_field("weights", np.ones((2, 1, 3, 4, 6))), r"set 'cross': weights: .*batch"),
        (_set_field("weights", np.full((1, 1, 4, 6), np.nan)), r"set 'cross': weights: .*finite"),
        (lambda e: e[1]["attention"]["cross"].pop("key_tokens"), r"set 'cross': key_tokens: miss"),
        (lambda e: e[2].pop("attention"), r"examples\[2\] \('ex2'\): attention: expected"),
        (lambda e: e.clear(), r"examples: expected a non-empty list"),
    ],
)
def test_attention_html_rejects_bad_examples(edit, match):
    examples = make_examples("cross")
    edit(examples)
    with pytest.raises(ValueError, match=match):
        viz.attention_html(examples)


_ASSETS = ("viewer.html", "viewer.css", "viewer.js")


def test_attention_html_inlines_the_asset_files():
    page = viz.attention_html(make_examples("self", batch=1))
    assets = Path(viz.__file__).parent / "assets"
    for name in ("viewer.css", "viewer.js"):
        text = (assets / name).read_text(encoding="utf-8")
        assert text.strip() and text.strip() in page
    assert "__STYLE__" not in page and "__SCRIPT__" not in page


@pytest.mark.slow
def test_wheel_ships_the_viewer_assets(tmp_path):
    # Built from a copy: pip builds in the source tree, and the build/ and
    # *.egg-info it leaves behind (stale files in build/lib reach later wheels)
    # have no place in the checkout. Plain `pip wheel` builds in an isolated
    # environment with the build requirements pyproject.toml names.
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(root / "kit", source / "kit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (root / name).exists():
            shutil.copy2(root / name, source / name)
    out = tmp_path / "wheel"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    start = time.perf_counter()
    build = subprocess.run(command, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert build.returncode == 0, f"{' '.join(command)} failed:\n{build.stdout}\n{build.stderr}"
    (wheel,) = out.glob("kit-*.whl")
    print(f"wheel built in {seconds:.1f} s: {wheel.name}")
    with zipfile.ZipFile(wheel) as zf:
        for name in _ASSETS:
            member = f"kit/assets/{name}"
            assert member in zf.namelist(), f"{member} missing from {wheel.name}"
            assert zf.read(member) == (root / "kit" / "assets" / name).read_bytes(), member


# --------------------------------------------------------------------------
# attention_rollout


def test_attention_rollout_hand_computed():
    # Layer 1: heads [[1, 0], [.5, .5]] and [[0, 1], [.5, .5]] average to all 0.5;
    #   0.5 * A + 0.5 * I = [[.75, .25], [.25, .75]].
    # Layer 2: both heads [[1, 0], [1, 0]]; 0.5 * A + 0.5 * I = [[1, 0], [.5, .5]].
    # R = A2 @ A1 = [[.75, .25], [.5 * .75 + .5 * .25, .5 * .25 + .5 * .75]]
    #             = [[.75, .25], [.5, .5]]
    # (the other order, A1 @ A2, would give [[.875, .125], [.625, .375]]).
    # Without the residual: [[1, 0], [1, 0]] @ [[.5, .5], [.5, .5]] = all 0.5.
    weights = np.array(
        [
            [[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]],
            [[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]],
        ]
    )  # [L=2, N=2, T=2, T=2]
    np.testing.assert_allclose(viz.attention_rollout(weights), [[0.75, 0.25], [0.5, 0.5]])
    np.testing.assert_allclose(viz.attention_rollout(weights, residual=False), np.full((2, 2), 0.5))


def test_attention_rollout_properties():
    batched = softmax_weights((3, 2, 4, 5, 5))  # [L, B, N, T, T]
    rollout = viz.attention_rollout(jnp.asarray(batched, jnp.float32))
    assert rollout.shape == (2, 5, 5)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-6)
    assert (rollout >= 0).all()
    for b in range(2):
        np.testing.assert_allclose(viz.attention_rollout(batched[:, b]), rollout[b], rtol=1e-6)
    one_layer = viz.attention_rollout(batched[:1, 0])
    np.testing.assert_allclose(one_layer, 0.5 * batched[0, 0].mean(0) + 0.5 * np.eye(5))
    # A fully masked query row (all zero weights) keeps to itself instead of vanishing.
    masked = batched[:, 0].copy()
    masked[:, :, 2] = 0.0
    np.testing.assert_allclose(viz.attention_rollout(masked).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 2, 3, 4), r"weights: expected self-attention with T = S.*T=3, S=4"),
        ((2, 3, 3), r"weights: expected rank 4 .*given rank 3"),
    ],
)
def test_attention_rollout_rejects_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        viz.attention_rollout(np.ones(shape))


# --------------------------------------------------------------------------
# The viewer in a real browser (Debian's chromium driven by playwright).


def _unavailable(reason):
    # CI installs chromium and playwright, so there a missing one is a failure.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _unavailable("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, tmp_path):
    """Opens an HTML page from disk; yields a loader and checks what it did on teardown."""
    page = browser.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def load(html):
        path = tmp_path / "attention.html"
        path.write_text(html, encoding="utf-8")
        page.goto(path.as_uri())
        return page

    yield load
    page.close()
    assert requests, "the page was never loaded"
    assert [u for u in requests if not u.startswith(("file://", "data:"))] == []
    assert errors == []


def lines(page, selector="line.attn"):
    """(head, query, key, weight) of every drawn line, sorted."""
    rows = page.eval_on_selector_all(
        selector,
        "els => els.map(e => [e.dataset.head, e.dataset.query, e.dataset.key, e.dataset.weight])",
    )
    return sorted((int(n), int(t), int(s), float(w)) for n, t, s, w in rows)


def expected_lines(weights, heads):
    w = np.round(weights, 4)  # [N, T, S] as embedded
    return sorted(
        (n, t, s, float(w[n, t, s]))
        for n in heads
        for t, s in np.ndindex(w.shape[1:])
        if w[n, t, s] >= 0.005  # the viewer skips invisible lines
    )


def readout(page):
    """{token: {head: weight}} from the hover table in #weights."""
    rows = page.eval_on_selector_all(
        "#weights-table tbody tr",
        "rows => rows.map(r => [r.querySelector('th').textContent, "
        "[...r.querySelectorAll('td')].map(c => [c.dataset.head, c.textContent])])",
    )
    return {tok: {int(n): float(v) for n, v in cells} for tok, cells in rows}


@pytest.mark.browser
def test_viewer_heads_layers_and_hover(open_page):
    (example,) = make_examples("self", batch=1, L=2, N=3, T=5)
    entry = example["attention"]["self"]
    w, toks = entry["weights"], entry["query_tokens"]
    page = open_page(viz.attention_html([example]))
    assert page.locator("#example-label").is_hidden()  # one example: no picker
    assert lines(page) == expected_lines(w[0], heads=[0, 1, 2])

    page.locator('.head-toggle[data-head="1"]').uncheck()
    assert lines(page) == expected_lines(w[0], heads=[0, 2])
    assert page.locator('line.attn[data-head="1"]').count() == 0

    page.select_option("#layer", "1")
    assert lines(page) == expected_lines(w[1], heads=[0, 2])
    assert lines(page) != expected_lines(w[0], heads=[0, 2])

    page.hover('.token.query[data-index="2"]')
    shown = lines(page, "line.attn:not(.faded)")
    assert shown and {t for _, t, _, _ in shown} == {2}
    assert "query 2" in page.locator("#weights caption").text_content()
    want = {k: {n: round(float(w[1, n, 2, s]), 4) for n in (0, 2)} for s, k in enumerate(toks)}
    assert readout(page) == want

    page.hover('.token.key[data-index="4"]')
    assert {s for _, _, s, _ in lines(page, "line.attn:not(.faded)")} == {4}
    want = {q: {n: round(float(w[1, n, t, 4]), 4) for n in (0, 2)} for t, q in enumerate(toks)}
    assert readout(page) == want


@pytest.mark.browser
def test_viewer_examples_sets_and_escaped_tokens(open_page):
    examples = make_examples("cross", batch=3, L=1, N=2, T=3, S=5)
    for b, example in enumerate(examples):
        example["attention"]["self"] = {
            "weights": softmax_weights((2, 2, 3, 3), seed=10 + b),
            "query_tokens": ["</script><b>", "x", "y"],
            "key_tokens": ["</script><b>", "x", "y"],
        }
    page = open_page(viz.attention_html(examples))
    assert page.locator("#example option").all_text_contents() == ["ex0", "ex1", "ex2"]
    assert page.locator("#set option").all_text_contents() == ["cross", "self"]
    assert page.locator(".token.key").count() == 5

    page.select_option("#set", "1")
    page.select_option("#example", "2")
    assert page.locator("#set").input_value() == "1"  # the set is kept across examples
    assert page.locator("#layer option").count() == 2
    assert page.locator(".token.query").all_text_contents() == ["</script><b>", "x", "y"]
    assert page.locator("#lines-view b, #weights b").count() == 0
    assert lines(page) == expected_lines(examples[2]["attention"]["self"]["weights"][0], [0, 1])
