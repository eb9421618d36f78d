"""Griffe extension for the API reference: read this package's docstrings as written.

Two house habits that griffe's Google parser does not know: the section header
``Example:`` (griffe only treats ``Examples:`` as a section, so doctests would render as
quoted markdown), and Sphinx roles such as ``:class:`Task``` (shown as plain code here).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


class HouseDocstrings(griffe.Extension):
    """Rewrites ``Example:`` to ``Examples:`` and Sphinx roles to code spans."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(r"`\1`", text)
