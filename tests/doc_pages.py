"""README.md and the reference pages under docs/, as the documentation tests read them. README keeps
the quick start and a short tour; the detail lives in docs/*.md. A fact or an example is checked
wherever it is, so a paragraph moved between pages stays checked, and a heading is looked up across
all pages (it must be unique there)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# README first, then the docs pages in name order: relative path -> text
PAGES = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
         for p in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))}
TEXT = "\n\n".join(PAGES.values())
FENCED = re.compile(r"^```\w*\n.*?^```", flags=re.MULTILINE | re.DOTALL)


def section(heading: str) -> str:
    """The one ``## `` section, on any page, whose title starts with ``heading`` (title line included,
    without the ``## ``), up to the next ``## `` heading or the end of its page."""
    found = [s for text in PAGES.values() for s in re.split(r"^## ", text, flags=re.MULTILINE)[1:]
             if s.startswith(heading)]
    assert len(found) == 1, f"README.md and docs/*.md have no single section {heading!r} ({len(found)} found)"
    return found[0]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens,
    repeats numbered (-1, -2 ...). Lines in fenced code blocks (shell comments) are not headings."""
    seen: dict[str, int] = {}
    out = set()
    for title in re.findall(r"^#{1,6} +(.+?) *#*$", FENCED.sub("", text), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def relative_links(text: str) -> list[str]:
    """Link targets that are not URLs (``http:``, ``mailto:`` ...): paths, with or without ``#anchor``."""
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
