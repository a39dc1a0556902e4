"""The README is a landing page: every relative link in it and in docs/ points at a file that exists."""

import re
from pathlib import Path

from tests.conftest import PROJECT_ROOT

LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def relative_links(page: Path) -> list[str]:
    return [link for link in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", link)]


def test_readme_and_docs_links_resolve():
    pages = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    broken = [
        f"{page.relative_to(PROJECT_ROOT)}: {link}"
        for page in pages
        for link in relative_links(page)
        if not (page.parent / link).exists()
    ]
    assert not broken, broken


def test_readme_links_every_docs_page_it_summarises():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for page in (
        "quickstart",
        "tryon",
        "hair",
        "catalogue",
        "registry",
        "deploy",
        "load-tests",
        "tests",
        "web",
        "hardening",
    ):
        assert f"docs/{page}.md" in readme, page
