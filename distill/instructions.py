"""A small instruction dataset built offline from documentation: one question/answer conversation per section.

    hybrid-mamba3 sft-data /usr/share/doc/python3.11/html/library --out instructions.jsonl

Each section (an HTML page's h1-h4 headings, Markdown's # headings, reStructuredText's underlined titles; a plain
text file is one section) with enough text becomes a row `{"messages": [user, assistant]}`: the user asks about the
section by its heading and page title (one of a few phrasings, chosen by a seeded hash so the file is the same on
every run), the assistant answers with the section's text, cut at a sentence end. It is for exercising the SFT
pipeline on real text without any download, not a quality instruction set.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

QUESTIONS = (
    "What does the {title} documentation say about {heading}?",
    "Explain {heading}, as described in {title}.",
    "Summarise the section \"{heading}\" of {title}.",
    "I am reading {title}. What should I know about {heading}?",
)
PAGE_QUESTIONS = (  # for a page's opening section, whose heading is the page title
    "What is {title}?",
    "Give an overview of {title}.",
    "What does the documentation of {title} cover?",
)
_HEADING = "\x01"  # marks a heading line in the text of an HTML page
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def _html_sections(html: str) -> list[tuple[str, str]]:
    from ..evals.text import html_to_text

    marked = re.sub(r"<h[1-4][^>]*>", lambda m: m.group(0) + _HEADING, html, flags=re.I)
    text = html_to_text(marked)
    sections, heading, lines = [], None, []
    for line in text.splitlines():
        if line.startswith(_HEADING):
            sections.append((heading, "\n".join(lines)))
            heading, lines = line[1:].strip(), []
        else:
            lines.append(line.replace(_HEADING, ""))
    sections.append((heading, "\n".join(lines)))
    return [(h, t) for h, t in sections if h]


def _markup_sections(text: str) -> list[tuple[str, str]]:
    """Markdown (# headings) and reStructuredText (a title line over an underline of one repeated mark)."""
    lines = text.splitlines()
    sections, heading, body = [], None, []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if re.match(r"^#{1,4}\s+\S", line):
            new = line.lstrip("#").strip()
        elif line.strip() and _RST_UNDERLINE.match(nxt) and len(nxt.strip()) >= len(line.strip()):
            new, i = line.strip(), i + 1
        else:
            body.append(line)
            i += 1
            continue
        sections.append((heading, "\n".join(body)))
        heading, body = new, []
        i += 1
    sections.append((heading, "\n".join(body)))
    return [(h, t) for h, t in sections if h]


def sections(path: Path) -> list[tuple[str, str, str]]:
    """(page title, section heading, section text) of one documentation file."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        found = _html_sections(raw)
    elif suffix in (".md", ".rst", ".markdown"):
        found = _markup_sections(raw)
    else:
        found = [(path.stem.replace("_", " ").replace("-", " "), raw)]
    title = found[0][0] if found else path.stem
    return [(title, h, " ".join(t.split())) for h, t in found]


def _answer(text: str, max_chars: int) -> str:
    """The text, cut at the last sentence end before max_chars (or at max_chars where it has none)."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind(".\n"), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > max_chars // 3 else cut.rstrip() + "..."


def instruction_rows(files: Iterable[Path], min_chars: int = 200, max_chars: int = 1200,
                     seed: int = 0) -> Iterator[dict]:
    for f in files:
        for title, heading, text in sections(f):
            if len(text) < min_chars:
                continue
            phrasings = PAGE_QUESTIONS if heading == title else QUESTIONS
            pick = int(hashlib.sha256(f"{seed}:{f.name}:{heading}".encode()).hexdigest(), 16) % len(phrasings)
            question = phrasings[pick].format(title=title, heading=heading)
            yield {"messages": [{"role": "user", "content": question},
                                {"role": "assistant", "content": _answer(text, max_chars)}]}


def build_instructions(sources: Iterable[str | Path], out: str | Path, min_chars: int = 200, max_chars: int = 1200,
                       seed: int = 0, max_rows: int | None = None) -> dict:
    """Write `out` (.jsonl) from the documentation files and directories in `sources` (walked in sorted order;
    .html/.htm, .md, .rst, .txt). Returns counts."""
    files = []
    for src in map(Path, sources):
        if not src.exists():
            raise ValueError(f"documentation path {str(src)!r} does not exist")
        files += sorted(f for f in src.rglob("*") if f.is_file()) if src.is_dir() else [src]
    files = [f for f in files if f.suffix.lower() in (".html", ".htm", ".md", ".markdown", ".rst", ".txt")]
    if not files:
        raise ValueError(f"no documentation files (.html, .md, .rst, .txt) under {[str(s) for s in sources]}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w", encoding="utf-8") as fh:
        for row in instruction_rows(files, min_chars, max_chars, seed):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
            if max_rows is not None and n >= max_rows:
                break
    if not n:
        raise ValueError(f"no section of {len(files)} files has {min_chars} characters of text: lower min_chars")
    return dict(files=len(files), rows=n, path=str(out))
