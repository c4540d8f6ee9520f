"""Every relative link of the README and docs/ reaches a file, and a heading where it names one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "examples").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.*)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M):
        s = slug(heading)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target} (no such heading)")
    return bad


def test_the_pages_links_resolve():
    found = {p.relative_to(ROOT).as_posix(): broken_links(p) for p in PAGES if p.exists()}
    assert not {k: v for k, v in found.items() if v}


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "b.md").write_text("# A heading, here\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#a-heading-here) [gone](c.md) [bad](b.md#elsewhere) [web](https://x.org/y)\n")
    assert broken_links(page) == ["c.md (no such file)", "b.md#elsewhere (no such heading)"]
