"""Every ``docs/<name>.md §N.M`` reference in the code (``docs/architectures.md``, ``docs/depthwise.md``,
any document added to docs/) resolves to a section of that document, so docstring citations cannot rot when
a document changes."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {path.stem: path for path in sorted((ROOT / "docs").glob("*.md"))}
SEARCHED = ("nnunet_lk", "tests", "benchmarks")

HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)
# "§4.3", "§4", "§4.3-4.6" / "§4.3–4.6"
SECTION = re.compile(r"§\s*(\d+)(?:\.(\d+))?(?:\s*[-–]\s*(\d+)\.(\d+))?")
# a citation: a document's file name, then the rest of the line up to the closing parenthesis
CITATION = re.compile(r"\b(" + "|".join(map(re.escape, DOCS)) + r")\.md([^)\n]*)")


def doc_sections(name: str) -> set:
    return set(HEADING.findall(DOCS[name].read_text(encoding="utf-8")))


def expand(match: re.Match) -> list:
    major, minor, end_major, end_minor = match.groups()
    if minor is None:
        return [major]
    if end_major is None:
        return [f"{major}.{minor}"]
    if end_major != major or int(end_minor) < int(minor):
        return [f"{major}.{minor}", f"{end_major}.{end_minor}"]
    return [f"{major}.{m}" for m in range(int(minor), int(end_minor) + 1)]


def citations():
    found = []
    for folder in SEARCHED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for cite in CITATION.finditer(line):
                    sections = [s for m in SECTION.finditer(cite.group(2)) for s in expand(m)]
                    found.append((f"{path.relative_to(ROOT)}:{lineno}", line.strip(), cite.group(1), sections))
    return found


def test_documents_exist_and_have_numbered_sections():
    assert {"architectures", "depthwise"} <= set(DOCS)
    sections = doc_sections("architectures")
    assert {"1", "2", "3", "4", "5", "6"} <= sections
    assert {"1.3", "2.2", "2.5", "3.2", "4.6", "5.1", "6.1"} <= sections
    assert {"1", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6"} <= doc_sections("depthwise")


@pytest.mark.parametrize("name,least,who", [("architectures", 10, "the backbone docstrings"),
                                            ("depthwise", 4, "blocks/depthwise.py and its plan functions")])
def test_the_code_cites_the_document(name, least, who):
    assert sum(doc == name for _, _, doc, _ in citations()) >= least, f"expected {who} to cite docs/{name}.md"


def test_every_code_citation_resolves():
    cites = citations()
    sections = {name: doc_sections(name) for name in DOCS}
    missing = [f"{where}: {doc}.md §{s} ({line})" for where, line, doc, secs in cites for s in secs
               if s not in sections[doc]]
    assert not missing, "citations of sections the docs/ document does not have:\n" + "\n".join(missing)
    uncited = [f"{where}: {line}" for where, line, _, secs in cites if not secs]
    assert not uncited, "a docs/ document cited without a section (§N.M):\n" + "\n".join(uncited)


@pytest.mark.parametrize("name", sorted(DOCS))
def test_cross_references_inside_the_document_resolve(name):
    text = DOCS[name].read_text(encoding="utf-8")
    missing = sorted({s for m in SECTION.finditer(text) for s in expand(m)} - doc_sections(name))
    assert not missing, f"docs/{name}.md refers to sections it does not have: {missing}"


@pytest.mark.parametrize("text,expected", [("§4.3-4.6", ["4.3", "4.4", "4.5", "4.6"]), ("§4", ["4"]),
                                           ("§5.5", ["5.5"])])
def test_section_ranges_expand(text, expected):
    assert expand(SECTION.search(text)) == expected
