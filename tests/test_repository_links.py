"""The repository stands alone: no tracked file points at the development machine's shared notes (../shared,
/work/...), and every relative link in Markdown and HTML resolves to a file inside the repository. The one folder
beside the repository that files may name is the shared data, ../shared/data: real data from public repositories,
which may not be committed, lives there (tests/data/README.md), and tests skip without it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".md", ".py", ".html", ".js", ".mjs", ".css", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".sh", ""}
OUTSIDE = re.compile(r"\.\./shared\b(?!/data\b)|(?<![\w.])shared/(DESIGN|STYLE|notes)\b|/work/(shared|main|wt-)")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")


def tracked_files() -> list[Path]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    return [ROOT / name for name in listing.decode().split("\0") if name]


def text_files() -> list[Path]:
    this_test = Path(__file__).resolve()  # it spells out what it looks for
    return [p for p in tracked_files() if p.suffix in TEXT_SUFFIXES and p.is_file() and p.resolve() != this_test
            and "vendor" not in p.relative_to(ROOT).parts and p.stat().st_size < 1_000_000]


def test_no_tracked_file_points_at_the_shared_notes():
    offenders = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in text_files()
                 for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not offenders, "these lines point outside the repository:\n" + "\n".join(offenders)


def _local_target(link: str) -> str | None:
    """The file part of a relative link; None for URLs, anchors, templates and data."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I) or link.startswith(("#", "//", "$", "{")):
        return None
    return link.split("#")[0].split("?")[0] or None


def test_relative_links_resolve_inside_the_repository():
    broken = []
    for path in text_files():
        if path.suffix not in (".md", ".html"):
            continue
        text = path.read_text(errors="replace")
        links = MARKDOWN_LINK.findall(text) if path.suffix == ".md" else HTML_LINK.findall(text)
        for link in links:
            target = _local_target(link)
            if target is None:
                continue
            resolved = (ROOT / target.lstrip("/")) if target.startswith("/") else (path.parent / target)
            resolved = resolved.resolve()
            where = f"{path.relative_to(ROOT)}: {link}"
            if not resolved.is_relative_to(ROOT):
                broken.append(f"{where} (leaves the repository)")
            elif not resolved.exists() and "node_modules" not in resolved.parts:  # npm ci installs those
                broken.append(f"{where} (no such file)")
    assert not broken, "broken or outside links:\n" + "\n".join(broken)


def test_the_checks_catch_what_they_look_for():
    assert OUTSIDE.search("See `../shared/DESIGN.md` for the layers")
    assert OUTSIDE.search("read /work/shared/notes/hypha.md")
    assert not OUTSIDE.search("the shared store (--database-url)")
    assert MARKDOWN_LINK.findall("[design](docs/design.md) and ![shot](docs/web-page.png)") == [
        "docs/design.md", "docs/web-page.png"]
    assert _local_target("https://bioimage.io") is None and _local_target("#usage") is None
    assert _local_target("../README.md#top") == "../README.md"
