"""Every cross-reference in the notebooks' markdown points to something that exists: "Section 3"
to a numbered heading of the notebook, "Exercise 2" to an item of its Exercises, "notebook 04"
to a notebook file, and "Eq. (12)", "Alg. 2", "Table 1", "Sec. 4.1" to a numbered item of the
paper they cite.

A reference belongs to the paper cited just before it ("Ho et al. 2020, Eq. (4)",
"Dhariwal & Nichol 2021, Sec. 4.1, Alg. 1"); a bare "Eq. (12)" or a "their Table 2" to the
paper cited last before it in the same cell, else to Ho et al. 2020, which every notebook
follows. "Section N" without a citation is the notebook's own; "Sec." is always a paper's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# The numbered items of each paper the notebooks cite, from the papers themselves (arXiv versions).
PAPERS = {
    # Ho, Jain & Abbeel 2020, arXiv 2006.11239v2: Eqs. (1)-(16) in the text, (17)-(22) in App. A;
    # Algs. 1-2 training and sampling, 3-4 sending and receiving x_0 (Sec. 4.3)
    "Ho et al. 2020": {
        "Eq": set(range(1, 23)), "Algorithm": {1, 2, 3, 4}, "Table": {1, 2, 3},
        "Section": {"1", "2", "3", "3.1", "3.2", "3.3", "3.4", "4", "4.1", "4.2", "4.3", "4.4", "5", "6"},
    },
    # Song, Meng & Ermon 2021 (DDIM), arXiv 2010.02502: Eq. (12) the step, Eq. (16) sigma(eta)
    "Song et al. 2021": {
        "Eq": set(range(1, 18)), "Algorithm": set(), "Table": {1, 2, 3},
        "Section": {"1", "2", "3", "3.1", "3.2", "4", "4.1", "4.2", "4.3", "5", "5.1", "5.2", "5.3", "5.4",
                    "6", "7"},
    },
    # Dhariwal & Nichol 2021, arXiv 2105.05233: Sec. 4 classifier guidance, Algs. 1 (DDPM) and 2 (DDIM)
    "Dhariwal & Nichol 2021": {
        "Eq": set(range(1, 14)), "Algorithm": {1, 2}, "Table": set(range(1, 10)),
        "Section": {"1", "2", "2.1", "2.2", "2.3", "3", "3.1", "3.2", "4", "4.1", "4.2", "4.3", "4.4",
                    "5", "6", "7", "8"},
    },
    # Ho & Salimans 2022, arXiv 2207.12598: Eq. (6) the guided noise, Algs. 1 (training) and 2 (sampling)
    "Ho & Salimans 2022": {
        "Eq": set(range(1, 7)), "Algorithm": {1, 2}, "Table": {1, 2},
        "Section": {"1", "2", "3", "3.1", "3.2", "4", "4.1", "4.2", "5", "6"},
    },
    # Nichol & Dhariwal 2021, arXiv 2102.09672: Eq. (17) the cosine schedule's alpha_bar
    "Nichol & Dhariwal 2021": {
        "Eq": set(range(1, 20)), "Algorithm": set(), "Table": set(range(1, 7)),
        "Section": {"1", "2", "2.1", "2.2", "3", "3.1", "3.2", "3.3", "3.4", "4", "5", "6", "7", "8"},
    },
    # Vaswani et al. 2017, arXiv 1706.03762: Sec. 3.5 the sinusoidal positional encoding
    "Vaswani et al. 2017": {
        "Eq": {1, 2, 3}, "Algorithm": set(), "Table": {1, 2, 3, 4},
        "Section": {"1", "2", "3", "3.1", "3.2", "3.3", "3.4", "3.5", "4", "5", "6", "7"},
    },
}
FOLLOWED = "Ho et al. 2020"  # what a bare equation number means when no paper was cited before it

# "Ho et al. 2020", "Dhariwal & Nichol 2021"; without its year ("Ho et al. (their Section 4)") a
# name stands for the one paper of PAPERS by those authors
CITATION = re.compile(r"(?P<paper>(?:[A-Z][a-z]+ et al\.|[A-Z][a-z]+ & [A-Z][a-z]+)(?: \d{4})?)")
KINDS = {"Section": "Section", "Sections": "Section", "Sec.": "Section", "Eq.": "Eq", "Eqs.": "Eq",
         "Algorithm": "Algorithm", "Alg.": "Algorithm", "Table": "Table", "Exercise": "Exercise",
         "notebook": "notebook", "notebooks": "notebook"}
ITEM = r"\(?\d+(?:\.\d+)?[a-z]?\)?"
REFERENCE = re.compile(rf"\b(?P<kind>{'|'.join(re.escape(k) for k in sorted(KINDS, key=len, reverse=True))}) "
                       rf"(?P<items>{ITEM}(?:(?:-|, | and | to ){ITEM})*)")
# just before a reference: a citation, possibly followed by other references of it ("..., Sec. 4.1, ")
CITED_JUST_BEFORE = re.compile(rf"{CITATION.pattern},(?: (?:{'|'.join(re.escape(k) for k in KINDS)}) {ITEM},)* $")


def numbers(items: str) -> list[str]:
    """'(6)-(7)' -> ['6', '7']; '2-3' -> ['2', '3']; '4-6' -> ['4', '5', '6']; '02-03' -> ['02', '03']."""
    tokens = re.findall(r"\d+(?:\.\d+)?[a-z]?", items)
    ranges = re.split(r", | and | to ", items)
    out = []
    for part in ranges:
        ends = re.findall(r"\d+(?:\.\d+)?[a-z]?", part)
        if len(ends) == 2 and "-" in part and ends[0].isdigit() and ends[1].isdigit():
            width = len(ends[0])
            out += [str(n).zfill(width) for n in range(int(ends[0]), int(ends[1]) + 1)]
        else:
            out += ends
    assert set(out) >= set(tokens)
    return out


def markdown_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


def headings(path: Path) -> set[str]:
    """The numbers of a notebook's sections: '## 3. ...' gives '3', '### 3b. ...' gives '3b'."""
    return {m.group(1) for text in markdown_cells(path) for m in re.finditer(r"^#{2,3} (\d+[a-z]?)\. ", text, re.M)}


def exercises(path: Path) -> set[str]:
    """The numbers of the items of a notebook's Exercises list (its last section, over cells)."""
    cells = markdown_cells(path)
    start = next((i for i, text in enumerate(cells) if "## Exercises" in text), len(cells))
    after = [cells[start].split("## Exercises", 1)[1]] + cells[start + 1:] if start < len(cells) else []
    return {m.group(1) for text in after for m in re.finditer(r"^(\d+)\. ", text, re.M)}


def paper(name: str) -> str:
    """A citation's paper: itself with a year, else the one paper of PAPERS by those authors."""
    if name in PAPERS or re.search(r"\d{4}$", name):
        return name
    matches = [known for known in PAPERS if known.startswith(name + " ")]
    return matches[0] if len(matches) == 1 else name


def references(path: Path) -> list[tuple[str, str, str, str]]:
    """(owner, kind, number, where) for every reference in the notebook's markdown; owner is a
    paper, 'this' (the notebook itself) or 'files' (a notebook number)."""
    found = []
    for text in markdown_cells(path):
        for match in REFERENCE.finditer(text):
            kind, before = KINDS[match["kind"]], text[:match.start()]
            cited_just_before = CITED_JUST_BEFORE.search(before)
            earlier = CITATION.findall(before)
            theirs = before.rstrip().endswith("their") or before.endswith("(their ")
            if kind == "notebook":
                owner = "files"
            elif cited_just_before:
                owner = paper(cited_just_before["paper"])
            elif kind == "Exercise" or (kind == "Section" and match["kind"] != "Sec." and not theirs):
                owner = "this"
            else:
                owner = paper(earlier[-1]) if earlier else FOLLOWED
            where = f"{path.name}: ...{text[max(0, match.start() - 60):match.end()]!r}"
            found += [(owner, kind, number, where) for number in numbers(match["items"])]
    return found


def dangling(path: Path) -> list[str]:
    """The references of the notebook at `path` that point to nothing, one line each."""
    sections_here, exercises_here = headings(path), exercises(path)
    numbered = {p.name[:2] for p in NOTEBOOKS}
    problems = []
    for owner, kind, number, where in references(path):
        if owner == "files":
            ok, what = number.zfill(2) in numbered, f"no notebook {number}"
        elif owner == "this":
            ok = number in (sections_here if kind == "Section" else exercises_here)
            what = f"no {kind} {number} in this notebook"
        else:
            items = PAPERS.get(owner)
            if items is None:
                problems.append(f"{where}: cites {owner}, which this test does not know; add its numbered items")
                continue
            ok = (int(number) in items[kind]) if kind != "Section" else number in items[kind]
            what = f"{owner} has no {kind} {number}"
        if not ok:
            problems.append(f"{where}: {what}")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_cross_reference_points_to_something_that_exists(path):
    problems = dangling(path)
    assert not problems, "\n".join(problems)


def test_a_reference_to_nothing_is_named(tmp_path):
    path = tmp_path / "dangling.ipynb"
    text = ("## 1. One\n\nSee Section 9, notebook 07, Exercise 5, Ho et al. 2020, Eq. (40), Alg. 5 and "
            "Smith et al. 2019, Eq. (1).\n\n## Exercises\n\n1. first\n")
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": [text]}]}))
    problems = dangling(path)
    assert [line.rsplit("': ", 1)[1] for line in problems] == [
        "no Section 9 in this notebook", "no notebook 07", "no Exercise 5 in this notebook",
        "Ho et al. 2020 has no Eq 40", "Ho et al. 2020 has no Algorithm 5",
        "cites Smith et al. 2019, which this test does not know; add its numbered items",
    ]


def test_the_reference_reader_finds_what_it_should(tmp_path):
    """The reader itself, on sentences written to trip it."""
    path = tmp_path / "references.ipynb"
    text = ("## 1. One\n\n### 1a. Sub\n\nAs in Section 1a and Sections 1-2 (Ho et al. 2020, Sec. 3.2, Alg. 1); "
            "DDIM (Song et al. 2021, Eqs. (12) and (16)), then Eq. (12) again, and notebooks 01-03. "
            "Ho et al. (their Section 4) and Exercise 2.\n\n## Exercises\n\n1. first\n")
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": [text]}]}))
    found = [(owner, kind, number) for owner, kind, number, _ in references(path)]
    assert found == [
        ("this", "Section", "1a"), ("this", "Section", "1"), ("this", "Section", "2"),
        ("Ho et al. 2020", "Section", "3.2"), ("Ho et al. 2020", "Algorithm", "1"),
        ("Song et al. 2021", "Eq", "12"), ("Song et al. 2021", "Eq", "16"), ("Song et al. 2021", "Eq", "12"),
        ("files", "notebook", "01"), ("files", "notebook", "02"), ("files", "notebook", "03"),
        ("Ho et al. 2020", "Section", "4"), ("this", "Exercise", "2"),
    ]
    assert headings(path) == {"1", "1a"} and exercises(path) == {"1"}
