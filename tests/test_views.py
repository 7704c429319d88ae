"""kit.views: notebook display (iframe srcdoc), saved pages, PNG and SVG figures.

The views in a browser (two on one page among them) are driven in test_viz.py.
"""

import html
import re
import struct
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from test_viz import embedded_data, make_examples, vector_set

from kit import views


def reading_like(attention, text="Mark told Sam", prediction="_ _ Mark"):
    class Reading:  # what views read of a kit.analysis.probe.Reading
        pass

    r = Reading()
    r.text, r.prediction, r.attention = text, prediction, attention
    return r


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_repr_html_is_the_page_in_a_sandboxed_srcdoc_frame():
    view = views.head_view(make_examples("self", batch=2))
    out = view._repr_html_()
    match = re.fullmatch(r'<iframe srcdoc="([^"]*)" sandbox="allow-scripts" .*></iframe>', out)
    assert match, out[:200]
    assert html.unescape(match.group(1)) == view.html()
    lowered = out.lower()
    for reference in ("http://", "https://", "require", "<script src"):
        assert reference not in lowered
    assert "<script" not in lowered  # every tag of the page is escaped inside the attribute
    assert f"height: {view.height}px" in out and 420 <= view.height <= 1200


def test_views_start_where_asked():
    entry = vector_set(L=2, N=3, T=5, S=5, causal=True)
    reading = reading_like(
        {"decoder": entry, "other": make_examples("self")[0]["attention"]["self"]}
    )
    starts = {
        "head": views.head_view(reading, set_name="other", layer=1, head=2),
        "model": views.model_view(reading),
        "neuron": views.neuron_view(reading, layer=1, head=2, query=3),
    }
    got = {name: embedded_data(v.html())["start"] for name, v in starts.items()}
    assert got["head"] == {"view": "head", "set": 1, "layer": 1, "head": 2, "query": 0}
    assert got["model"]["view"] == "model"
    assert got["neuron"] == {"view": "neuron", "set": 0, "layer": 1, "head": 2, "query": 3}
    data = embedded_data(starts["neuron"].html())
    assert data["examples"][0]["name"] == "Mark told Sam"
    assert data["examples"][0]["prediction"] == "_ _ Mark"
    assert "<title>Mark told Sam</title>" in starts["model"].html()


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda r: views.neuron_view(r, layer=2),
            r"layer: expected a layer .*in \[0, 2\), given 2",
        ),
        (lambda r: views.neuron_view(r, head=3), r"head: expected a head \(N=3\) index"),
        (lambda r: views.neuron_view(r, query=5), r"query: expected a query token index"),
        (lambda r: views.neuron_view(r, set_name="x"), r"set_name: expected one of"),
        (lambda r: views.neuron_view(r, set_name="plain"), r"view: 'neuron' needs the set's"),
        (lambda r: views.head_view(r, head=-1), r"head: expected a head"),
        (
            lambda r: views.head_view("text"),
            r"source: expected a kit.analysis.probe.Reading or a list",
        ),
        (lambda r: views.View(make_examples("self"), height=0), r"height: expected a positive"),
        (lambda r: views.diff_view(r, make_examples("self")), r"b: expected one example, given 3"),
    ],
)
def test_views_reject_bad_arguments(make, match):
    plain = make_examples("self", batch=1)[0]["attention"]["self"]
    reading = reading_like({"s": vector_set(L=2, N=3, T=5, S=5), "plain": plain})
    with pytest.raises(ValueError, match=match):
        make(reading)


def test_save_writes_the_page(tmp_path):
    view = views.model_view(make_examples("cross"))
    view.save(tmp_path / "model.html")
    assert (tmp_path / "model.html").read_text(encoding="utf-8") == view.html()
    with pytest.raises(ValueError, match=r"path: expected a file name ending in \.html"):
        view.save(tmp_path / "model.png")


@pytest.mark.parametrize(
    "kwargs, heatmaps, title",
    [
        ({"layer": 1, "head": 2}, 1, "cross attention: ex0, layer 1, head 2"),
        ({"layer": 0}, 3, "cross attention: ex0, layer 0"),
        ({}, 2 * 3, "cross attention: ex0"),
    ],
)
def test_save_figure_png_one_head_a_layer_or_all(tmp_path, kwargs, heatmaps, title):
    (example,) = make_examples("cross", batch=1, L=2, N=3, T=4, S=6)
    w = example["attention"]["cross"]["weights"]
    path = tmp_path / "figure.png"
    fig = views.head_view([example]).save_figure(path, **kwargs)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == heatmaps
    assert fig.get_suptitle() == title
    want = w[kwargs["layer"]] if "layer" in kwargs else w
    if "head" in kwargs:
        want = want[kwargs["head"]]
    got = np.stack([ax.images[0].get_array() for ax in axes])
    np.testing.assert_array_equal(got, np.reshape(want, (-1, 4, 6)))
    width, height = png_size(path)
    inches = fig.get_size_inches() * 150  # plot_attention saves at 150 dpi
    assert abs(width - inches[0]) <= 1 and abs(height - inches[1]) <= 1


def test_save_figure_svg_parses(tmp_path):
    path = tmp_path / "layer.svg"
    fig = views.model_view(make_examples("self", batch=1)).save_figure(path, layer=1)
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    width = float(root.get("width").removesuffix("pt"))
    assert width == pytest.approx(fig.get_size_inches()[0] * 72, abs=1)
    # One raster per head and one for the colour bar.
    assert len(root.findall(".//{http://www.w3.org/2000/svg}image")) == 3 + 1


def test_diff_view_figure_is_b_minus_a_on_a_centred_scale(tmp_path):
    examples = make_examples("self", batch=2, L=2, N=2, T=4)
    view = views.diff_view(examples[:1], examples[1:])
    assert embedded_data(view.html())["compare"] == {"a": 0, "b": 1}
    assert embedded_data(view.html())["start"]["view"] == "diff"
    fig = view.save_figure(tmp_path / "diff.png", layer=1)
    diff = examples[1]["attention"]["self"]["weights"] - examples[0]["attention"]["self"]["weights"]
    images = [ax.images[0] for ax in fig.axes if ax.images]
    np.testing.assert_allclose(np.stack([i.get_array() for i in images]), diff[1])
    m = np.abs(diff[1]).max()
    assert (images[0].norm.vmin, images[0].norm.vmax) == pytest.approx((-m, m))
    assert images[0].get_cmap().name == "RdBu_r"
    assert fig.get_suptitle() == "self attention, b - a, layer 1"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": 2}, r"layer: expected a valid index in \[0, 2\), given 2"),
        ({"layer": 0, "head": 3}, r"head: expected a valid index in \[0, 3\), given 3"),
        ({"head": 1}, r"head: give layer too"),
        ({"example": 1}, r"example: expected a valid index in \[0, 1\), given 1"),
        ({"set_name": "decoder"}, r"set_name: expected one of \['cross'\], given 'decoder'"),
    ],
)
def test_save_figure_rejects_bad_arguments(tmp_path, kwargs, match):
    view = views.head_view(make_examples("cross", batch=1))
    with pytest.raises(ValueError, match=match):
        view.save_figure(tmp_path / "f.png", **kwargs)
    with pytest.raises(ValueError, match=r"path: expected a file name ending in \.png or \.svg"):
        view.save_figure(tmp_path / "f.pdf")


def test_attention_set_is_one_value_read_by_attribute_or_key():
    from kit.analysis.record import AttentionSet

    w = np.full((1, 2, 3, 3), 1 / 3)
    entry = AttentionSet(w, list("abc"), list("abc"), causal=False)
    assert entry.weights is entry["weights"] and entry["query_tokens"] == ["a", "b", "c"]
    assert set(entry) == {"weights", "query_tokens", "key_tokens", "causal"}
    assert "bias" not in entry and len(entry) == 4
    with pytest.raises(KeyError):
        entry["bias"]
    (example,) = views.from_arrays(w[0], list("abc"))
    assert isinstance(example["attention"]["attention"], AttentionSet)
