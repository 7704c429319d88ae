"""MkDocs hook: links from docs/ to repository files outside it, on the site.

The notes in docs/ are read on GitHub as well as on the site, so they link to files
beside docs/ by relative paths (`../README.md#...`). On the site such a path has no
page; this hook points it at the file in the repository (`repo_url` and `edit_uri`
of mkdocs.yml) instead. It rewrites only links that leave docs/ and name a file that
exists in the repository; every other link, a broken one included, is left for
`mkdocs build --strict` to check.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urljoin

# An inline Markdown link whose target climbs out of the page's folder: ](../x.md#y)
_LINK = re.compile(r"\]\((?P<path>(?:\.\./)+[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    if not page.edit_url:  # no repository to point at: leave the links to validation
        return markdown
    docs = Path(config.docs_dir).resolve()
    root = Path(config.config_file_path).resolve().parent
    folder = (docs / page.file.src_path).parent

    def repository_link(match: re.Match) -> str:
        target = (folder / match["path"]).resolve()
        if target.is_relative_to(docs) or not target.is_relative_to(root):
            return match[0]
        if not target.is_file():
            return match[0]
        return f"]({urljoin(page.edit_url, match['path'])}{match['anchor'] or ''})"

    return _LINK.sub(repository_link, markdown)
