"""The API reference builds with `mkdocs build --strict`, and the package metadata a release needs.

The site (mkdocs.yml) is hand-written pages in docs/ with `::: kit.name` entries that
mkdocstrings renders from the docstrings; --strict turns every warning into a failure:
a broken link, a page left out of the navigation, a docstring that documents a
parameter the signature lacks.
"""

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import kit

ROOT = Path(__file__).resolve().parents[1]
DIST = "jax-attention-kit"

# Page -> API entries whose headings the page must carry (mkdocstrings' anchor ids).
API_PAGES = {
    "api/attention.html": [
        "kit.dot_product_attention",
        "kit.chunked_attention",
        "kit.causal_mask",
        "kit.multi_head_attention",
    ],
    "api/flex_attention.html": [
        "kit.flex_attention",
        "kit.create_block_mask",
        "kit.attention.mods",
        "kit.attention.mods.alibi",
    ],
    "api/models.html": [
        "kit.models.ModelConfig",
        "kit.models.build",
        "kit.models.EncoderDecoder",
        "kit.pretrained.load",
        "kit.pretrained.save",
        "kit.hf.Output",
    ],
    "api/training.html": ["kit.training.train_and_evaluate", "kit.training.load_checkpoint"],
    "api/interpretability.html": [
        "kit.analysis.interp.head_scores",
        "kit.analysis.probe.read_attention",
        "kit.views.figures.plot_attention",
        "kit.views.notebook.model_view",
        "kit.analysis.patching.patch_text",
    ],
}


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner
    return subprocess.run(
        [*command, "-d", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("docs") / "site"
    build = _mkdocs_build(ROOT / "mkdocs.yml", site)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    return site


def test_builds_strict_with_every_page(site):
    for page in ("index.html", "design.html", *API_PAGES):
        assert (site / page).is_file(), page


@pytest.mark.parametrize("page", sorted(API_PAGES))
def test_api_pages_render_the_docstrings(site, page):
    text = (site / page).read_text(encoding="utf-8")
    for name in API_PAGES[page]:
        assert f'id="{name}"' in text, f"{page} has no entry for {name}"
    # An entry that mkdocstrings could not render leaves its `::: name` line behind.
    assert ":::" not in text


def test_the_design_page_is_docs_design_md(site):
    text = (site / "design.html").read_text(encoding="utf-8")
    assert "The public contract" in text and "House style" in text


def test_links_to_files_beside_docs_point_at_the_repository(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    text = (site / "benchmarks.html").read_text(encoding="utf-8")
    assert f'href="{config["repo_url"]}/blob/main/README.md#the-experiment-configs"' in text


def test_the_hook_leaves_a_broken_link_to_strict(tmp_path):
    # docs/hooks.py rewrites a link out of docs/ only to a file that exists; a link to
    # a missing one still fails the strict build.
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# readme\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        "site_name: t\n"
        "repo_url: https://example.org/r\n"
        "edit_uri: blob/main/docs/\n"
        f"hooks: [{ROOT / 'docs' / 'hooks.py'}]\n"
    )
    page = tmp_path / "docs" / "index.md"
    page.write_text("[readme](../README.md#readme)\n")
    good = _mkdocs_build(config, tmp_path / "site")
    assert good.returncode == 0, good.stderr
    html = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert 'href="https://example.org/r/blob/main/README.md#readme"' in html

    page.write_text("[gone](../MISSING.md)\n")
    bad = _mkdocs_build(config, tmp_path / "site")
    assert bad.returncode != 0 and "MISSING.md" in bad.stderr


def test_installed_metadata_is_the_projects():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == DIST
    meta = importlib.metadata.metadata(DIST)
    # A stale install (an older pyproject.toml) shows here first.
    assert meta["Version"] == project["version"]
    assert kit.__version__ == project["version"]  # the version the code reports
    urls = dict(entry.split(", ", 1) for entry in meta.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Documentation", "Source", "Issues"}
    assert importlib.metadata.distribution(DIST).read_text("top_level.txt").split() == ["kit"]
