"""Everything the README and docs import from ``datatrace`` is exported there."""

import re
from pathlib import Path

import datatrace

ROOT = Path(__file__).resolve().parents[1]


def _imported_from_top_level(text: str) -> set[str]:
    names: set[str] = set()
    for match in re.finditer(r"from datatrace import \(?([\w\s,]+?)\)?\s*$", text, re.M):
        names.update(n.split(" as ")[0].strip() for n in match.group(1).split(",") if n.strip())
    return names


def test_every_name_in_all_is_importable():
    missing = [n for n in datatrace.__all__ if not hasattr(datatrace, n)]
    assert missing == []


def test_readme_and_docs_import_only_exported_names():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    used = set().union(*(_imported_from_top_level(p.read_text()) for p in pages))
    assert {"Task", "CheckpointRecorder", "make_grouper"} <= used
    assert sorted(used - set(datatrace.__all__)) == []


def test_fit_returns_the_attributor_itself():
    import torch

    model = torch.nn.Linear(3, 2).eval()
    attr = datatrace.GradDotAttributor(datatrace.Task(model))
    assert attr.fit((torch.randn(4, 3), torch.randint(0, 2, (4,)))) is attr
