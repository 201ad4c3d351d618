"""Plain text from documentation files (HTML via the standard library's html.parser)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable

_SKIP = {"script", "style", "head", "title", "nav"}
_BLOCK = {"p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "dt", "dd", "section", "table"}


class _Text(HTMLParser):
    """Collects visible text; with main_only, only inside the element with role="main" (Sphinx's page body)."""

    def __init__(self, main_only: bool = False):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.main_only, self.main_depth, self.depth = main_only, None, 0

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            self.depth += 1
            if self.main_only and self.main_depth is None and ("role", "main") in attrs:
                self.main_depth = self.depth
        if self.main_only and self.main_depth is None:
            return
        if tag in _SKIP:
            self.skip += 1
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "div":
            if self.main_depth == self.depth:
                self.main_depth = -1  # done: nothing after the main element
            self.depth -= 1
        if self.main_only and (self.main_depth is None or self.main_depth < 0):
            return
        if tag in _SKIP and self.skip:
            self.skip -= 1
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.main_only and (self.main_depth is None or self.main_depth < 0):
            return
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page (only its role="main" element when it has one), blank lines collapsed."""
    p = _Text(main_only='role="main"' in html)
    p.feed(html)
    p.close()
    text = "".join(p.parts).replace("\xb6", "")  # Sphinx permalink marks
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_texts(files: Iterable[str | Path]) -> list[str]:
    """Texts of the given files (HTML stripped), empty ones dropped."""
    out = []
    for f in map(Path, files):
        text = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix.lower() in (".html", ".htm"):
            text = html_to_text(text)
        if text.strip():
            out.append(text)
    return out
