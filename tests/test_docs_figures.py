"""Every benchmark figure the README quotes is traceable to a fragment written by a script (issue: figures are
never copied by hand). A README table row, bullet or paragraph that names a fragment (`docs/bench_*.md`,
`docs/precision.md`) may quote only numbers that appear in it; every fragment names the script and the command
that wrote it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FRAGMENTS = sorted((ROOT / "docs").glob("bench_*.md")) + [ROOT / "docs" / "precision.md"]
CITE = re.compile(r"docs/(bench_[\w]+\.md|precision\.md)")
# a decimal figure (not part of a word or a version number), e.g. 0.0286, 1.33, 2.15
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+)(?![\w.]*\d)")


def _blocks(text: str) -> list[str]:
    """README table rows and list items (with their continuation lines), one string each."""
    blocks: list[str] = []
    for line in text.splitlines():
        if line.startswith("|") or line.lstrip().startswith("- ") or not blocks or not line.strip():
            blocks.append(line)
        else:
            blocks[-1] += " " + line.strip()
    return blocks


def _citing_blocks() -> list[tuple[str, list[str]]]:
    return [(b, CITE.findall(b)) for b in _blocks(README) if CITE.search(b)]


def test_every_fragment_names_its_script_and_command():
    assert FRAGMENTS, "no docs/bench_*.md fragments"
    for frag in FRAGMENTS:
        text = frag.read_text()
        m = re.search(r"[Ww]ritten by `?(benchmarks/[\w]+\.py)", text[:2000])
        assert m, f"{frag.name} lacks the 'written by benchmarks/X.py' marker"
        script = m.group(1)
        assert (ROOT / script).is_file(), f"{frag.name} names {script}, which does not exist"
        assert f"python {script}" in text, f"{frag.name} does not give the command that wrote it"


def test_every_fragment_the_docs_cite_exists():
    cited = CITE.findall(README)  # README: docs/bench_x.md; docs/benchmarks.md links them as (bench_x.md)
    cited += re.findall(r"\((bench_\w+\.md|precision\.md)\)", (ROOT / "docs" / "benchmarks.md").read_text())
    assert len(cited) > 10
    for name in cited:
        assert (ROOT / "docs" / name).is_file(), f"the docs cite docs/{name}, which does not exist"


def _roundings(text: str) -> set[str]:
    """Every decimal number of ``text`` (sign dropped), written with 1 to its own number of decimals."""
    out: set[str] = set()
    for num in re.findall(r"\d+\.\d+", text):
        value, places = float(num), len(num.split(".")[1])
        out.update(f"{value:.{k}f}" for k in range(1, places + 1))
    return out


@pytest.mark.parametrize("block, names", _citing_blocks(), ids=lambda v: v[0] if isinstance(v, list) else None)
def test_readme_figures_appear_in_the_fragment_they_cite(block, names):
    """A quoted figure may be rounded (0.2946 -> 0.29) but must be one of the fragment's numbers."""
    text = "\n".join((ROOT / "docs" / n).read_text() for n in names if (ROOT / "docs" / n).is_file())
    known = _roundings(text)
    # quoted settings (`n_t = 128`) and citations are not figures
    figures = NUMBER.findall(re.sub(r"`[^`]*`", "", CITE.sub("", block)))
    missing = [f for f in figures if f not in known]
    assert not missing, f"README figures {missing} are not in {names}: {block[:160]}..."
