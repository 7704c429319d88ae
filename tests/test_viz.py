"""kit.views: heatmaps and the offline HTML viewer (also driven in Chromium)."""

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

from kit import views
from kit.views import figures, viewer


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
    fig = figures.plot_attention(softmax_weights((L, N, T, S)), query, key, title="t")
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
    fig = figures.plot_attention(jnp.asarray(softmax_weights(shape)), list("abc"), list("wxyz"))
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == count
    assert heatmaps[-1].get_title() == ("head 1" if count == 2 else "")


def test_plot_attention_labels_whitespace_tokens_visibly():
    fig = figures.plot_attention(softmax_weights((3, 3)), list("a b"), ["a", "\n", "b"])
    ax = fig.axes[0]
    assert tick_texts(ax.get_yticklabels()) == ["a", "␣", "b"]
    assert tick_texts(ax.get_xticklabels()) == ["a", "\\n", "b"]


@pytest.mark.parametrize("suffix, signature", [(".png", b"\x89PNG\r\n\x1a\n"), (".svg", b"<svg")])
def test_plot_attention_saves_by_suffix(tmp_path, suffix, signature):
    path = tmp_path / f"attention{suffix}"
    figures.plot_attention(softmax_weights((2, 3, 3)), list("abc"), list("abc"), path=path)
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
        figures.plot_attention(np.ones(shape), query, key, **kwargs)


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
    page = viewer.attention_html(examples, title="dates")
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
    page = viewer.attention_html(examples, title="<i>t</i>")
    assert evil not in page
    assert "<b>" not in page and "<i>" not in page
    assert "&lt;i&gt;t&lt;/i&gt;" in page
    data = embedded_data(page)
    assert data["examples"][0]["name"] == "example 0"
    assert data["examples"][0]["sets"][0]["query_tokens"] == [evil, "x"]
    path = tmp_path / "a.html"
    viewer.write_attention_html(path, examples, title="<i>t</i>")
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
        viewer.attention_html(examples)


_ASSETS = ("viewer.html", "viewer.css", "viewer.js")


def test_attention_html_inlines_the_asset_files():
    page = viewer.attention_html(make_examples("self", batch=1))
    assets = Path(viewer.__file__).parent / "assets"
    for name in ("viewer.css", "viewer.js"):
        text = (assets / name).read_text(encoding="utf-8")
        assert text.strip() and text.strip() in page
    assert "__STYLE__" not in page and "__SCRIPT__" not in page


@pytest.mark.slow
def test_wheel_ships_the_viewer_assets_and_the_decode_kernel(tmp_path):
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
    (wheel,) = out.glob("jax_attention_kit-*.whl")
    print(f"wheel built in {seconds:.1f} s: {wheel.name}")
    with zipfile.ZipFile(wheel) as zf:
        for name in _ASSETS:
            member = f"kit/views/assets/{name}"
            assert member in zf.namelist(), f"{member} missing from {wheel.name}"
            assert zf.read(member) == (root / "kit" / "views" / "assets" / name).read_bytes(), (
                member
            )
        # The compiled decode kernel (setup.py) is in the wheel; CI's machines build it.
        kernels = [m for m in zf.namelist() if m.startswith("kit/attention/_decode_cpu")]
        if os.environ.get("CI"):
            assert len(kernels) == 1 and kernels[0].endswith(".so"), zf.namelist()


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
    page = open_page(viewer.attention_html([example]))
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
    page = open_page(viewer.attention_html(examples))
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


# --------------------------------------------------------------------------
# The neuron, model, pinned and diff views: data made in numpy.


def vector_set(L=2, N=3, T=5, S=5, H=4, *, causal=False, bias=False, seed=0):
    """A set with float32 q, k, v (and bias) and the weights numpy computes from them."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(L, N, T, H)).astype(np.float32)
    k = rng.normal(size=(L, N, S, H)).astype(np.float32)
    v = rng.normal(size=(L, N, S, H)).astype(np.float32)
    entry = {
        "query_tokens": tokens(T, "q"),
        "key_tokens": tokens(S, "k") if S != T or not causal else tokens(T, "q"),
        "query_vectors": q,
        "key_vectors": k,
        "value_vectors": v,
        "causal": causal,
        "value_norms": np.linalg.norm(v, axis=-1) * np.arange(1, S + 1),  # [L, N, S]
    }
    if bias:
        entry["bias"] = rng.normal(size=(L, N, T, S)).astype(np.float32)
    entry["weights"] = numpy_attention(entry)[0]
    return entry


def numpy_attention(entry):
    """Weights [L, N, T, S] and outputs [L, N, T, H] from a set's vectors, in float64."""
    q, k, v = (entry[f] for f in ("query_vectors", "key_vectors", "value_vectors"))
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("lnth,lnsh->lnts", q, k) / np.sqrt(q.shape[-1])
    logits = logits + np.asarray(entry.get("bias", 0.0), np.float64)
    if entry["causal"]:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    w = e / e.sum(-1, keepdims=True)
    return w, np.einsum("lnts,lnsh->lnth", w, v)


def test_attention_html_embeds_vectors_at_full_precision():
    entry = vector_set(causal=True, bias=True)
    page = viewer.attention_html([{"attention": {"decoder": entry}, "prediction": "p"}])
    (got,) = embedded_data(page)["examples"][0]["sets"]
    for field in ("query_vectors", "key_vectors", "value_vectors", "bias", "value_norms"):
        # float32 -> float64 -> JSON -> float64 is exact.
        np.testing.assert_array_equal(np.asarray(got[field]), np.asarray(entry[field], np.float64))
    assert got["causal"] is True
    assert embedded_data(page)["examples"][0]["prediction"] == "p"
    assert embedded_data(page)["start"] == {
        "view": "head", "set": 0, "layer": 0, "head": None, "query": 0
    }  # fmt: skip
    plain = embedded_data(viewer.attention_html(make_examples("self", batch=1)))
    assert "query_vectors" not in plain["examples"][0]["sets"][0]
    assert "compare" not in plain


def _with(**fields):
    def edit(entry):
        entry.update(fields)

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_with(query_vectors=np.ones((2, 3, 4, 4))), r"set 's': query_vectors: expected shape "
         r"\[2, 3, 5, H\], given \(2, 3, 4, 4\)"),
        (_with(key_vectors=np.ones((2, 3, 5, 3))), r"key_vectors: expected head dim H=4"),
        (_with(value_vectors=np.full((2, 3, 5, 4), np.inf)), r"value_vectors: expected finite"),
        (lambda e: e.pop("value_vectors"), r"value_vectors: missing; the neuron view needs"),
        (_with(bias=np.ones((2, 3, 5, 4))), r"bias: expected shape \[2, 3, 5, 5\]"),
        (_with(causal="yes"), r"causal: expected True or False, given 'yes'"),
        (_with(value_norms=-np.ones((2, 3, 5))), r"value_norms: expected norms >= 0"),
        (_with(value_norms=np.ones((2, 3, 4))), r"value_norms: expected shape \[2, 3, 5\]"),
    ],
)  # fmt: skip
def test_attention_html_rejects_bad_vectors(edit, match):
    entry = vector_set()
    edit(entry)
    with pytest.raises(ValueError, match=match):
        viewer.attention_html([{"attention": {"s": entry}}])


def test_attention_html_rejects_bias_without_vectors_and_causal_cross():
    entry = make_examples("cross", batch=1)[0]["attention"]["cross"]
    with pytest.raises(ValueError, match=r"bias: given without query_vectors"):
        viewer.attention_html([{"attention": {"x": {**entry, "bias": np.zeros((2, 3, 4, 6))}}}])
    with pytest.raises(
        ValueError, match=r"causal: needs self-attention with T = S, given T=4, S=6"
    ):
        viewer.attention_html([{"attention": {"x": {**entry, "causal": True}}}])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"view": "graph"},
            r"view: expected one of head, model, neuron, diff, patching, given 'graph'",
        ),
        ({"layer": 2}, r"layer: expected a layer .* index in \[0, 2\), given 2"),
        ({"layer": 1.0}, r"layer: expected an integer index"),
        ({"head": 3}, r"head: expected a head \(N=3\) index in \[0, 3\), given 3"),
        ({"query": -1}, r"query: expected a query token index in \[0, 4\), given -1"),
        ({"set_name": "nope"}, r"set_name: expected one of \['self'\]"),
        ({"view": "neuron"}, r"view: 'neuron' needs the set's query_vectors"),
        ({"view": "diff"}, r"view: 'diff' needs compare=\(a, b\)"),
        ({"compare": (0, 0)}, r"compare: expected two different examples"),
        ({"compare": (0, 3)}, r"compare: expected a example index in \[0, 3\), given 3"),
        ({"compare": 1}, r"compare: expected two example indices"),
    ],
)
def test_attention_html_rejects_bad_start(kwargs, match):
    with pytest.raises(ValueError, match=match):
        viewer.attention_html(make_examples("self"), **kwargs)


def test_attention_html_compare_needs_an_aligned_set():
    examples = make_examples("self", batch=2)
    examples[1]["attention"]["self"] = make_examples("self", batch=1, T=5)[0]["attention"]["self"]
    with pytest.raises(ValueError, match=r"compare: examples 0 and 1 share no attention set of"):
        viewer.attention_html(examples, compare=(0, 1))


def test_plot_attention_diverging_scale_is_centred_on_zero():
    diff = softmax_weights((2, 3, 3), seed=1) - softmax_weights((2, 3, 3), seed=2)
    fig = figures.plot_attention(diff, list("abc"), list("abc"), diverging=True)
    image = fig.axes[0].images[0]
    m = np.abs(diff).max()
    assert (image.norm.vmin, image.norm.vmax) == (-m, m)
    assert image.get_cmap().name == "RdBu_r"
    np.testing.assert_array_equal(image.get_array(), diff[0])
    assert fig.axes[-1].get_ylabel() == "difference in attention weight"


def neuron_readout(page):
    """Per key row: masked, q⊙k, q·k, scaled, logit, softmax; and the output vector."""
    rows = page.eval_on_selector_all(
        "#neuron-table tr.neuron-key",
        "rows => rows.map(r => ({...r.dataset}))",
    )
    out = json.loads(page.get_attribute("#neuron-output", "data-values"))
    q = json.loads(page.get_attribute("#neuron-table .query-vector", "data-values"))
    return rows, np.asarray(out), np.asarray(q)


@pytest.mark.browser
@pytest.mark.parametrize(
    "shape, causal, bias",
    [((2, 3, 5, 5, 4), True, True), ((1, 2, 3, 6, 8), False, False)],  # decoder-like, cross
)
def test_neuron_view_numbers_equal_numpy(open_page, shape, causal, bias):
    L, N, T, S, H = shape
    entry = vector_set(L, N, T, S, H, causal=causal, bias=bias)
    weights, outputs = numpy_attention(entry)
    q, k = (np.asarray(entry[f], np.float64) for f in ("query_vectors", "key_vectors"))
    page = open_page(
        viewer.attention_html([{"attention": {"s": entry}}], view="neuron", layer=L - 1, head=1)
    )
    assert page.locator("#neuron-view").is_visible() and page.locator("#head-view").is_hidden()
    for layer, head, query in [(L - 1, 1, 0), (L - 1, 1, T - 1), (0, 0, T // 2)]:
        page.select_option("#layer", str(layer))
        page.select_option("#neuron-head", str(head))
        page.select_option("#neuron-query", str(query))
        table = page.locator("#neuron-table")
        assert (table.get_attribute("data-layer"), table.get_attribute("data-head")) == (
            str(layer),
            str(head),
        )
        rows, out, qv = neuron_readout(page)
        np.testing.assert_array_equal(qv, q[layer, head, query])
        product = q[layer, head, query] * k[layer, head]  # [S, H]
        dot = product.sum(-1)
        scaled = dot / np.sqrt(H)
        logit = scaled + (entry["bias"][layer, head, query] if bias else 0.0)
        masked = np.arange(S) > query if causal else np.zeros(S, bool)
        assert [r["masked"] == "true" for r in rows] == masked.tolist()
        got = {f: np.array([float(r[f]) for r in rows]) for f in ("dot", "scaled", "logit")}
        np.testing.assert_allclose([json.loads(r["product"]) for r in rows], product, rtol=1e-12)
        np.testing.assert_allclose(got["dot"], dot, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["scaled"], scaled, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["logit"], logit, rtol=1e-9, atol=1e-12)
        softmax = np.array([float(r["weight"]) for r in rows])
        np.testing.assert_allclose(softmax, weights[layer, head, query], rtol=1e-9, atol=1e-15)
        assert softmax[masked].tolist() == [0.0] * int(masked.sum())
        np.testing.assert_allclose(out, outputs[layer, head, query], rtol=1e-9, atol=1e-12)
        shown = page.locator("#neuron-table tr.neuron-key td.model").all_text_contents()
        assert shown == [f"{w:.4f}" for w in np.round(weights[layer, head, query], 4)]


@pytest.mark.browser
def test_neuron_view_equals_the_models_weights(open_page):
    """A real model's reading (grouped-query heads, ALiBi bias): the page's softmax from
    the model's q and k equals the weights the model returned."""
    import jax
    from helpers import load_config

    from kit import training
    from kit.analysis import probe

    overrides = {"model.num_layers": 2, "model.num_kv_heads": 1, "model.positions": "alibi"}
    with jax.numpy_dtype_promotion("standard"):
        s = training.setup(load_config("pronoun", **overrides))
        graphdef, params = training.init_model(s.mcfg, jax.random.key(0, impl="rbg"))
        reading = probe.read_attention(
            s.task, graphdef, params, "Mark told Sam that he was leaving."
        )
    entry = reading.attention["encoder"]
    assert "bias" in entry and entry["key_vectors"].shape[1] == 2  # N=2 from K=1
    page = open_page(viewer.attention_html([{"attention": reading.attention}], view="neuron"))
    for layer, head, query in [(0, 0, 4), (1, 1, 0)]:
        page.select_option("#layer", str(layer))
        page.select_option("#neuron-head", str(head))
        page.select_option("#neuron-query", str(query))
        rows, _, _ = neuron_readout(page)
        softmax = np.array([float(r["weight"]) for r in rows])
        np.testing.assert_allclose(softmax, entry["weights"][layer, head, query], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.browser
def test_a_loaded_bert_in_the_head_and_neuron_views(open_page, tmp_path):
    """A Hugging Face BERT (written by the test, with a tokenizer trained there), read by
    the probe: the head view draws the definition's weights over the tokenizer's tokens,
    and the neuron view's softmax of the model's q and k gives them back."""
    from flax import nnx
    from test_pretrained import (
        TEXTS,
        bert_config,
        bert_weights,
        reference_bert,
        write_checkpoint,
        write_tokenizer,
    )

    from kit import hf, pretrained
    from kit.analysis import probe

    weights = bert_weights(seed=21)
    folder = write_checkpoint(tmp_path / "bert", bert_config(), weights)
    tokenizer = write_tokenizer(folder)
    model = pretrained.load(folder)
    task = hf.TokenizerTask.for_model(model, "bert")
    reading = probe.read_attention(task, *nnx.split(model), TEXTS[0])
    ids = np.array(tokenizer.encode(TEXTS[0]).ids)
    _, maps, _ = reference_bert(weights, ids, np.zeros(len(ids), int), len(ids))
    page = open_page(viewer.attention_html([{"attention": reading.attention}]))
    shown = page.eval_on_selector_all(".token.key", "els => els.map(e => e.textContent)")
    assert [t.strip() for t in shown] == TEXTS[0].split()
    assert lines(page) == expected_lines(maps[0], heads=range(maps.shape[1]))
    page = open_page(viewer.attention_html([{"attention": reading.attention}], view="neuron"))
    page.select_option("#layer", "1")
    page.select_option("#neuron-head", "1")
    page.select_option("#neuron-query", "4")  # "he"
    rows, _, _ = neuron_readout(page)
    softmax = np.array([float(r["weight"]) for r in rows])
    np.testing.assert_allclose(softmax, maps[1, 1, 4], rtol=1e-4, atol=1e-5)


def thumb_pixels(page, selector, cells):
    """RGB at the centre of each (t, s) cell of a heatmap canvas with cells["S"] columns."""
    return page.eval_on_selector(
        selector,
        """(c, cells) => {
          const ctx = c.getContext('2d');
          const size = c.width / cells.S;
          return cells.at.map(([t, s]) =>
            [...ctx.getImageData((s + 0.5) * size, (t + 0.5) * size, 1, 1).data.slice(0, 3)]);
        }""",
        cells,
    )


@pytest.mark.browser
def test_model_view_thumbnails_and_click_opens_the_head(open_page):
    (example,) = make_examples("cross", batch=1, L=2, N=3, T=4, S=6)
    w = example["attention"]["cross"]["weights"]
    page = open_page(viewer.attention_html([example], view="model"))
    assert page.locator("#model-view").is_visible() and page.locator("#layer-label").is_hidden()
    assert page.locator("canvas.thumb").count() == 2 * 3
    # Thumbnail cells fade from white to the head's colour with the weight.
    blue = np.array([31, 119, 180])  # head 0's colour
    at = [[t, s] for t in range(4) for s in range(6)]
    got = thumb_pixels(page, 'canvas.thumb[data-layer="1"][data-head="0"]', {"S": 6, "at": at})
    want = np.round(255 - (255 - blue) * np.round(w[1, 0], 4).reshape(-1, 1))
    np.testing.assert_allclose(got, want, atol=1)

    page.click('canvas.thumb[data-layer="1"][data-head="2"]')
    assert page.locator("#view").input_value() == "head"
    assert page.locator("#head-view").is_visible() and page.locator("#model-view").is_hidden()
    assert page.locator("#layer").input_value() == "1"
    checked = page.eval_on_selector_all(".head-toggle", "bs => bs.map(b => b.checked)")
    assert checked == [False, False, True]
    assert lines(page) == expected_lines(w[1], heads=[2])


def strongest_reference(weights, share):
    """The fewest largest weights (ties: lower index first) whose sum reaches share x total."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    order = [i for i in np.argsort(-w, kind="stable") if w[i] > 0]
    cumulative = np.cumsum(w[order])
    count = int(np.searchsorted(cumulative, share * cumulative[-1])) + 1
    return sorted(order[:count])


@pytest.mark.browser
def test_pinned_token_from_and_to_with_a_threshold(open_page):
    (example,) = make_examples("cross", batch=1, L=1, N=3, T=4, S=7)
    w = np.round(example["attention"]["cross"]["weights"][0], 4)  # [N, T, S] as embedded
    page = open_page(viewer.attention_html([example]))

    def set_threshold(share):
        page.eval_on_selector(
            "#threshold",
            "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }",
            str(share),
        )

    page.click('.token.query[data-index="2"]')
    for share in (1.0, 0.8, 0.5):
        set_threshold(share)
        want = sorted(
            (n, 2, s, float(w[n, 2, s]))
            for n in range(3)
            for s in strongest_reference(w[n, 2], share)
        )
        assert lines(page) == want, share
    assert page.locator("#threshold-value").text_content() == "0.50"
    page.hover('.token.key[data-index="0"]')  # hovering leaves the pinned token alone
    assert {t for _, t, _, _ in lines(page)} == {2}
    assert page.locator("#weights-table").get_attribute("data-kind") == "query"

    page.click('.token.key[data-index="5"]')  # attention *to* key 5, normalized by its sum
    for share in (0.6, 0.9):
        set_threshold(share)
        want = sorted(
            (n, t, 5, float(w[n, t, 5]))
            for n in range(3)
            for t in strongest_reference(w[n, :, 5], share)
        )
        assert lines(page) == want, share
    page.locator('.head-toggle[data-head="1"]').uncheck()
    assert {n for n, _, _, _ in lines(page)} == {0, 2}

    page.click('.token.key[data-index="5"]')  # released: every line again
    set_threshold(1.0)
    assert lines(page) == expected_lines(w, heads=[0, 2])


@pytest.mark.browser
def test_value_weighted_lines(open_page):
    entry = vector_set(L=1, N=2, T=4, S=4, causal=True)
    w, norms = np.round(entry["weights"][0], 4), entry["value_norms"][0]  # [N, T, S], [N, S]
    page = open_page(viewer.attention_html([{"attention": {"s": entry}}]))
    page.check("#value-weighted")
    weighted = w * norms[:, None, :]
    weighted = weighted / weighted.sum(-1, keepdims=True)
    got = lines(page)
    want = expected_lines(weighted, heads=[0, 1])
    assert [g[:3] for g in got] == [x[:3] for x in expected_lines(weighted, [0, 1])]
    np.testing.assert_allclose([g[3] for g in got], [x[3] for x in want], atol=6e-5)
    page.uncheck("#value-weighted")
    assert lines(page) == expected_lines(w, heads=[0, 1])


@pytest.mark.browser
def test_diff_view_diverging_scale(open_page):
    examples = make_examples("self", batch=2, L=2, N=2, T=4)
    a = examples[0]["attention"]["self"]
    b = examples[1]["attention"]["self"]
    b["weights"] = a["weights"].copy()
    b["weights"][1, 0] = np.eye(4)  # only layer 1, head 0 changes
    b["query_tokens"] = b["key_tokens"] = ["q0_0", "Anna", "q0_2", "q0_3"]
    examples[0]["prediction"], examples[1]["prediction"] = "Mark", "Anna"
    page = open_page(viewer.attention_html(examples, view="diff", compare=(0, 1)))
    assert page.locator("#diff-view").is_visible()
    assert page.locator(".diff-prediction").all_text_contents() == [
        "a: ex0 → Mark",
        "b: ex1 → Anna",
    ]
    assert page.locator("canvas.diff-cell").count() == 4
    diff = np.round(b["weights"], 4) - np.round(a["weights"], 4)
    for l, n in np.ndindex(2, 2):
        got = json.loads(
            page.get_attribute(
                f'canvas.diff-cell[data-layer="{l}"][data-head="{n}"]', "data-values"
            )
        )
        np.testing.assert_allclose(got, diff[l, n], atol=1e-12)
    limit = float(page.get_attribute("#diff-colorbar", "data-limit"))
    assert limit == pytest.approx(np.abs(diff).max(), abs=1e-12)
    at = [[t, s] for t in range(4) for s in range(4)]
    changed = np.array(
        thumb_pixels(page, 'canvas.diff-cell[data-layer="1"][data-head="0"]', {"S": 4, "at": at})
    )
    d = diff[1, 0].reshape(-1)
    clear = np.abs(d) > 0.1 * limit  # fainter ones may round to white
    red, blue = changed[clear & (d > 0)], changed[clear & (d < 0)]
    assert len(red) and len(blue)
    assert (red[:, 0] > red[:, 2]).all() and (blue[:, 2] > blue[:, 0]).all()
    strongest = changed[np.argmax(np.abs(d))]
    assert strongest.tolist() == ([178, 24, 43] if d[np.argmax(np.abs(d))] > 0 else [33, 102, 172])
    same = thumb_pixels(page, 'canvas.diff-cell[data-layer="0"][data-head="1"]', {"S": 4, "at": at})
    assert np.all(np.array(same) == 255)  # no change: white
    cell = 'canvas.diff-cell[data-layer="1"][data-head="0"]'
    size = int(page.get_attribute(cell, "data-cell"))
    page.hover(cell, position={"x": 2, "y": 2})
    readout = page.locator("#diff-readout").text_content()
    assert readout.startswith("layer 1, head 0: q0_0 → q0_0: ")
    assert f"b − a {diff[1, 0, 0, 0]:.4f}" in readout
    page.hover(cell, position={"x": 2 + 2 * size, "y": 2 + size})  # query 1, key 2
    readout = page.locator("#diff-readout").text_content()
    assert readout.startswith("layer 1, head 0: q0_1→Anna → q0_2: ")
    assert f"b − a {diff[1, 0, 1, 2]:.4f}" in readout


@pytest.mark.browser
def test_two_views_on_one_page_do_not_clash(open_page):
    from kit import views

    first = views.head_view(make_examples("self", batch=1, L=2, N=3, T=4), title="first")
    second = views.model_view(make_examples("cross", batch=1, L=1, N=2, T=3, S=5), title="second")
    host = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        f'<div style="display:flex"><div style="flex:1">{first._repr_html_()}</div>'
        f'<div style="flex:1">{second._repr_html_()}</div></div></body></html>'
    )
    page = open_page(host)
    one, two = page.frame_locator("iframe >> nth=0"), page.frame_locator("iframe >> nth=1")
    assert one.locator("#title").text_content() == "first"
    assert two.locator("#title").text_content() == "second"
    assert one.locator("line.attn").count() > 0 and one.locator("canvas.thumb").count() == 0
    assert two.locator("canvas.thumb").count() == 2 and two.locator("#model-view").is_visible()

    one.locator("#layer").select_option("1")
    one.locator('.head-toggle[data-head="0"]').uncheck()
    assert two.locator("#view").input_value() == "model"
    assert two.locator(".head-toggle").count() == 2
    two.locator('canvas.thumb[data-head="1"]').click()  # opens head 1 in the second view only
    assert two.locator("#view").input_value() == "head"
    assert one.locator("#layer").input_value() == "1"
    assert one.locator('.head-toggle[data-head="0"]').is_checked() is False
    assert one.locator('.head-toggle[data-head="1"]').is_checked()
    w = make_examples("cross", batch=1, L=1, N=2, T=3, S=5)[0]["attention"]["cross"]["weights"]
    two_lines = two.locator("line.attn").evaluate_all(
        "els => els.map(e => [e.dataset.head, e.dataset.query, e.dataset.key, e.dataset.weight])"
    )
    got = sorted((int(n), int(t), int(s), float(x)) for n, t, s, x in two_lines)
    assert got == expected_lines(w[0], heads=[1])


@pytest.mark.browser
@pytest.mark.parametrize("measures", ["in the page", "0 (laid out before it shows)"])
def test_head_view_from_arrays_keeps_long_tokens_whole(browser, tmp_path, measures):
    """views.head_view(weights, tokens) in one call, as BertViz's; every token lies inside
    the drawing, also where the page measures text as 0 wide (an iframe in a notebook
    laid out before it shows, which clipped "leaving" to "eaving")."""
    tokens = ["Mark", "told", "Sam", "that", "he", "was", "leaving", "extraordinarily"]
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(8), size=(2, 3, 8))  # [L, N, T, S]
    path = tmp_path / "head.html"
    views.head_view(list(weights[:, None]), tokens).save(path)  # per-layer [1, N, T, S]
    page = browser.new_page()
    if measures.startswith("0"):
        page.add_init_script("SVGTextContentElement.prototype.getComputedTextLength = () => 0;")
    page.goto(path.as_uri())
    boxes = page.eval_on_selector_all(
        "#lines-view text.token",
        "els => els.map(e => { const b = e.getBBox(); return [e.textContent, b.x, b.width]; })",
    )
    width = float(page.get_attribute("#lines-view", "width"))
    page.close()
    assert sorted(t for t, _, _ in boxes) == sorted(tokens * 2)
    for token, x, w in boxes:
        assert x >= 0 and x + w <= width, (token, x, w, width)


def patching_result(L=2, N=3, T=4, seed=0):
    """A TextPatching with known values: one head and one position carry the answer."""
    from kit.analysis.patching import TextPatching

    rng = np.random.default_rng(seed)
    heads = np.zeros((L, N))
    heads[1, 2] = 0.8
    heads[0, 0] = -0.4
    positions = np.zeros((L, T))
    positions[0, 2] = 1.0
    return TextPatching(
        clean_tokens=tokens(T, "c"),
        corrupt_tokens=[*tokens(T, "c")[:2], "other", *tokens(T, "c")[3:]],
        position=T - 1,
        right="yes",
        wrong="no",
        clean=2.5,
        corrupt=-1.0,
        head_points=[f"encoder.{l}.attn.heads" for l in range(L)],
        position_points=[f"encoder.{l}.resid_pre" for l in range(L)],
        heads=heads,
        heads_attribution=heads + rng.normal(0, 0.1, heads.shape),
        positions=positions,
        positions_attribution=positions * 0.7,
    )


def test_patching_view_embeds_the_result_and_names_bad_fields():
    result = patching_result()
    examples = make_examples("self", batch=2, T=4)
    data = embedded_data(viewer.attention_html(examples, view="patching", patching=result))
    got = data["patching"]
    np.testing.assert_array_equal(got["heads"], result.heads)
    np.testing.assert_array_equal(got["positions_attribution"], result.positions_attribution)
    assert got["corrupt_tokens"][2] == "other" and got["position"] == 3
    # The to_json() dict a run writes reads the same.
    from_json = embedded_data(viewer.attention_html(examples, patching=result.to_json()))
    assert from_json["patching"] == got
    with pytest.raises(ValueError, match=r"^view: 'patching' needs patching="):
        viewer.attention_html(examples, view="patching")
    bad = {
        "heads": (np.zeros((3, 3)), r"^patching: heads: expected shape \[2, N\]"),
        "positions": (np.zeros((2, 5)), r"^patching: positions: expected shape \[2, 4\]"),
        "heads_attribution": (np.full((2, 3), np.nan), "heads_attribution: expected finite"),
        "positions_attribution": (np.zeros((2, 3)), r"positions_attribution: .* \[2, 4\]"),
        "position": (4, r"^patching: position: expected a token index in \[0, 4\)"),
        "corrupt_tokens": (["a"], r"^patching: corrupt_tokens: 1 tokens"),
    }
    for field, (value, match) in bad.items():
        edited = {**result.to_json(), field: value}
        with pytest.raises(ValueError, match=match):
            viewer.attention_html(examples, patching=edited)
    none = {**result.to_json(), "head_points": []}
    with pytest.raises(ValueError, match=r"^patching: head_points: expected at least one"):
        viewer.attention_html(examples, patching=none)
    wide = {**result.to_json(), "heads_attribution": np.zeros((2, 4))}  # N differs
    with pytest.raises(ValueError, match=r"heads_attribution: expected shape \[2, 3\]"):
        viewer.attention_html(examples, patching=wide)
    with pytest.raises(ValueError, match=r"^patching: right: missing"):
        viewer.attention_html(
            examples, patching={k: v for k, v in result.to_json().items() if k != "right"}
        )


@pytest.mark.browser
def test_patching_view_heatmaps_and_hover(open_page):
    result = patching_result()
    examples = make_examples("self", batch=2, T=4)
    page = open_page(views.patching_view(result, examples[:1], examples[1:]).html())
    assert page.locator("#patching-view").is_visible() and page.locator("#set-label").is_hidden()
    assert page.locator("canvas.patching-cell").count() == 4
    summary = page.locator("#patching-summary").text_content()
    assert '"yes" (clean) vs "no" (corrupted)' in summary and "2.500 clean" in summary
    # One diverging scale from -1 to 1 (no value is larger): 0 is white, 1 the red end.
    heads = 'canvas.patching-cell[data-field="heads"]'
    rgb = thumb_pixels(page, heads, {"S": 3, "at": [[1, 2], [0, 0], [0, 1]]})
    expected = [
        255 + (np.array(end) - 255) * t
        for end, t in (([178, 24, 43], 0.8), ([33, 102, 172], 0.4), ([255] * 3, 0))
    ]
    np.testing.assert_allclose(rgb, np.round(expected), atol=1)
    positions = 'canvas.patching-cell[data-field="positions"]'
    assert thumb_pixels(page, positions, {"S": 4, "at": [[0, 2]]}) == [[178, 24, 43]]
    labels = page.locator(".patching-columns").nth(2).locator("span").all_text_contents()
    assert labels == ["c0", "c1", "c2/other", "c3"]
    size = int(page.get_attribute(heads, "data-cell"))
    page.hover(heads, position={"x": 2 * size + 2, "y": size + 2})  # layer 1, head 2
    text = page.locator("#patching-readout").text_content()
    attribution = result.heads_attribution[1, 2]
    assert (
        text
        == f"encoder.1.attn.heads, head 2: activation patching 0.800, attribution {attribution:.3f}"
    )
    # The attention of both runs is in the other views.
    page.select_option("#view", "head")
    assert page.locator("#example option").count() == 2 and page.locator("line.attn").count() > 0


@pytest.mark.browser
def test_patching_view_is_offered_only_with_a_result(open_page):
    page = open_page(viewer.attention_html(make_examples("self", batch=1)))
    assert page.eval_on_selector('#view option[value="patching"]', "o => o.disabled")
