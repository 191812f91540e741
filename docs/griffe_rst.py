"""Griffe extension for the docs build: render the reST bits of the package's docstrings as Markdown.

The docstrings follow torchmetrics' style (Google sections with reST ``.. math::`` blocks and ``:class:`` roles),
which reads well in ``help()`` but which mkdocstrings would print verbatim. This rewrites, at load time:

- ``.. math:: <formula>`` (and its indented continuation lines) into a ``$$ ... $$`` block (pymdownx.arithmatex);
- ``:math:`<formula>``` into inline ``$...$``;
- ``:class:``/``:func:``/``:meth:``/``:attr:``/``:mod:``/``:data:`` roles into autorefs links when the target is a
  public object of this package (resolved in the docstring's scope, so a typo fails ``mkdocs build --strict``), and
  into inline code when the target is private or belongs to another package (no inventory is fetched offline).
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|obj|exc):`~?([^`]+)`")
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")
_PACKAGE = "sparse_metrics"

logger = griffe.get_logger("griffe_rst")


def _math_blocks(text: str) -> str:
    """Turn each ``.. math::`` directive (first line plus more-indented continuation lines) into ``$$`` lines."""
    lines = text.splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        match = _MATH_BLOCK.match(lines[index])
        if match is None:
            out.append(lines[index])
            index += 1
            continue
        indent = match["indent"]
        formula = [match["first"].strip()] if match["first"].strip() else []
        index += 1
        while (
            index < len(lines) and lines[index].strip() and len(lines[index]) - len(lines[index].lstrip()) > len(indent)
        ):
            formula.append(lines[index].strip())
            index += 1
        out.extend([f"{indent}$$", *(f"{indent}{line}" for line in formula), f"{indent}$$"])
    return "\n".join(out)


def _is_public(path: str) -> bool:
    parts = path.split(".")
    return parts[0] == _PACKAGE and not any(part.startswith("_") for part in parts)


def _link(obj: griffe.Object, target: str) -> str:
    """A Markdown link to ``target`` (resolved from ``obj``'s scope), or inline code where no page documents it."""
    written, shown = target, target.rsplit(".", 1)[-1]
    head = target.split(".", 1)[0]
    if head != _PACKAGE:
        try:
            target = obj.resolve(head) + target[len(head) :]
        except griffe.NameResolutionError:
            if importlib.util.find_spec(head) is None:
                # A typo or a stale name: a warning, which fails `mkdocs build --strict`.
                logger.warning("%s: cannot resolve the reference `%s` in its docstring", obj.path, written)
            # Otherwise another library (torch, torchmetrics): shown as code, since no inventory is fetched offline.
            return f"`{written}`"
    if not target.startswith(f"{_PACKAGE}."):
        return f"`{written}`"
    if not _is_public(target):
        # Private helpers are not on the site; the name is still worth showing.
        return f"`{shown}`"
    return f"[`{shown}`][{target}]"


class RestToMarkdown(griffe.Extension):
    """Rewrite reST math and roles in every docstring of the package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Walk every object of the package once it is fully loaded (so names resolve)."""
        self._rewrite(pkg, seen=set())

    def _rewrite(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            text = _math_blocks(obj.docstring.value)
            text = _INLINE_MATH.sub(lambda m: f"${m[1]}$", text)
            text = _ROLE.sub(lambda m: _link(obj, m[2]), text)
            obj.docstring.value = text
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member, seen)  # type: ignore[arg-type]
