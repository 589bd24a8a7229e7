"""Every ``docs/architectures.md §N.M`` reference in the code resolves to a section of that document, so
docstring citations cannot rot when the document changes."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architectures.md"
SEARCHED = ("nnunet_lk", "tests", "benchmarks")

HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)
# "§4.3", "§4", "§4.3-4.6" / "§4.3–4.6"
SECTION = re.compile(r"§\s*(\d+)(?:\.(\d+))?(?:\s*[-–]\s*(\d+)\.(\d+))?")
# a citation: the file name, then the rest of the line up to the closing parenthesis
CITATION = re.compile(r"architectures\.md([^)\n]*)")


def doc_sections() -> set:
    return set(HEADING.findall(DOC.read_text(encoding="utf-8")))


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
                    sections = [s for m in SECTION.finditer(cite.group(1)) for s in expand(m)]
                    found.append((f"{path.relative_to(ROOT)}:{lineno}", line.strip(), sections))
    return found


def test_document_exists_and_has_numbered_sections():
    sections = doc_sections()
    assert {"1", "2", "3", "4", "5", "6"} <= sections
    assert {"1.3", "2.2", "2.5", "3.2", "4.6", "5.1", "6.1"} <= sections


def test_every_code_citation_resolves():
    cites = citations()
    assert len(cites) >= 10, "expected the backbone docstrings to cite docs/architectures.md"
    sections = doc_sections()
    missing = [f"{where}: §{s} ({line})" for where, line, secs in cites for s in secs if s not in sections]
    assert not missing, "citations of sections docs/architectures.md does not have:\n" + "\n".join(missing)
    uncited = [f"{where}: {line}" for where, line, secs in cites if not secs]
    assert not uncited, "architectures.md cited without a section (§N.M):\n" + "\n".join(uncited)


def test_cross_references_inside_the_document_resolve():
    text = DOC.read_text(encoding="utf-8")
    sections = doc_sections()
    missing = sorted({s for m in SECTION.finditer(text) for s in expand(m)} - sections)
    assert not missing, f"docs/architectures.md refers to sections it does not have: {missing}"


@pytest.mark.parametrize("text,expected", [("§4.3-4.6", ["4.3", "4.4", "4.5", "4.6"]), ("§4", ["4"]),
                                           ("§5.5", ["5.5"])])
def test_section_ranges_expand(text, expected):
    assert expand(SECTION.search(text)) == expected
