"""docs/walkthrough.ipynb runs from top to bottom (nbclient), so it cannot rot."""

import html
import os

import nbformat
import pytest
from helpers import ROOT
from nbclient import NotebookClient

NOTEBOOK = os.path.join(ROOT, "docs", "walkthrough.ipynb")


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_walkthrough_runs(monkeypatch):
    # The kernel trains 300 steps: XLA's optimizations pay for themselves there (the
    # suite turns them off for its subprocesses, whose programs run a few steps). One
    # CPU device, as where a reader opens it: on the suite's 8 simulated devices the
    # training cell took 18.9 s instead of 11.3 s.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "false")
    monkeypatch.setenv("XLA_FLAGS", "")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_path = {"metadata": {"path": os.path.dirname(NOTEBOOK)}}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources=env_path).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # The views render inline: self-contained HTML in an iframe, no script from a network.
    pages = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(pages) == 3
    for page in map(html.unescape, pages):
        assert "<iframe" in page and 'src="http' not in page and "require" not in page.lower()
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "prediction: _ _ _ _ Mark _ _ _" in text
