"""mkdocs hooks: pages that show a repository file (README, CHANGELOG, examples/README).

A page whose markdown is ``<!-- include: PATH -->`` lines gets the file at PATH (relative to
the repository root) in their place, so the site never holds a copy that drifts. Links in
the included file are rewritten to work from the page: a link into ``docs/`` points at that
page, a link to another included file at the page showing it, and a link to anything else
in the repository (a script) keeps its text and loses the link.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.M)
LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")
# repository file -> the docs page that includes it
SHOWN_ON = {"README.md": "index.md", "CHANGELOG.md": "changelog.md", "examples/README.md": "examples.md"}


def _rewrite(text: str, source: str, page: str) -> str:
    def fix(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+:|#", target):  # absolute URL or same-page anchor
            return match.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        if repo_path in SHOWN_ON:
            doc = SHOWN_ON[repo_path]
        elif repo_path.startswith("docs/"):
            doc = repo_path[len("docs/") :]
        else:
            return f"{label} (`{repo_path}`)" if label.strip("`") != repo_path else label
        rel = posixpath.relpath(doc, posixpath.dirname(page) or ".")
        return f"[{label}]({rel}{'#' + anchor if anchor else ''})"

    return LINK.sub(fix, text)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def include(match: re.Match[str]) -> str:
        source = match.group(1)
        text = (ROOT / source).read_text(encoding="utf-8")
        return _rewrite(text, source, page.file.src_uri)

    return INCLUDE.sub(include, markdown)
