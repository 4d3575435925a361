"""The repository stands alone: its text files cite only files it ships.

Scans every file git knows (tracked, or untracked and not ignored) with a text suffix for references to design notes
that live outside the repository (a `shared/` folder, GOLD_TASK.md, LOSSES.md), for `docs/*.md` paths and the
sections they cite ("docs/gold_task.md, 'Sample enough'"), and, in Markdown files, for relative links `](path)` to
files that do not exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".ipynb", ".txt", ".cfg", ".sh"}
OUTSIDE = re.compile(r"(?<![\w.-])(?:\.\./)?shared/|GOLD_TASK|\bLOSSES\.md")
DOCS_PATH = re.compile(r"\bdocs/[\w./-]+\.md\b")
# A cited section: docs/<page>.md, '<title>' (titles may hold apostrophes, as in "DPO's", and wrap across lines).
SECTION = re.compile(r"docs/([\w-]+\.md)\)?, '(.+?)'(?![A-Za-z])", re.S)
MD_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def text_files() -> list[Path]:
    """The repository's text files, this one left out: its patterns and examples would match themselves."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the shipped file list is unknown")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    here = Path(__file__).resolve()
    files = [ROOT / f for f in listed if f and Path(f).suffix in TEXT_SUFFIXES and (ROOT / f).is_file()]
    files = [f for f in files if f.resolve() != here]
    assert len(files) > 50, "the scan should see the whole repository"
    return files


def _headings(page: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")}


def _one_line(text: str) -> str:
    """A title as written across comment or docstring lines, on one line."""
    return re.sub(r"\s*\n\s*(?:#\s*)?", " ", text).strip()


def test_no_reference_to_files_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for path in text_files()
             for text in [path.read_text(errors="replace")] for m in OUTSIDE.finditer(text)]
    assert not found, "cite the repository's own docs (docs/gold_task.md, docs/loss_pitfalls.md):\n" + "\n".join(found)


def test_cited_docs_and_their_sections_exist():
    missing = []
    for path in text_files():
        text = path.read_text(errors="replace")
        missing += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in DOCS_PATH.finditer(text)
                    if not (ROOT / m.group(0)).is_file()]
        for m in SECTION.finditer(text):
            page, title = ROOT / "docs" / m.group(1), _one_line(m.group(2))
            if page.is_file() and title not in _headings(page):
                missing.append(f"{path.relative_to(ROOT)}: no section '{title}' in docs/{m.group(1)}")
    assert not missing, "\n".join(missing)


def test_relative_markdown_links_point_to_files():
    broken = []
    for path in text_files():
        if path.suffix != ".md":
            continue
        for target in MD_LINK.findall(path.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL or an anchor
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: ]({target})")
    assert not broken, "\n".join(broken)


def test_the_scans_catch_what_they_look_for(tmp_path):
    """The patterns themselves: each finds its target and leaves look-alikes alone."""
    assert OUTSIDE.search("see ../shared/STYLE.md") and OUTSIDE.search("(GOLD_TASK pitfall 3)")
    assert OUTSIDE.search("shared/LOSSES.md") and not OUTSIDE.search("model.scoring.share_prompt, prompt-shared/x")
    m = SECTION.search("docs/loss_pitfalls.md, 'Reference-free rewards are not DPO's rewards').")
    assert m and m.group(2) == "Reference-free rewards are not DPO's rewards"
    m = SECTION.search("(docs/gold_task.md, 'The same beta means different things\n# across losses').")
    assert m and _one_line(m.group(2)) == "The same beta means different things across losses"
    assert MD_LINK.findall('[a](docs/x.md) [b](https://x.org) [c](#dpo) [d](y.md "title")') == [
        "docs/x.md", "https://x.org", "#dpo", "y.md"]
