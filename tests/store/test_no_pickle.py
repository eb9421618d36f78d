"""No pickle of untrusted data anywhere in the library (DESIGN.md §5, issue 18)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "datatrace"
# (module, function) -> the keyword and value every call must pass
SAFE = {
    ("torch", "load"): ("weights_only", True),
    ("np", "load"): ("allow_pickle", False),
    ("numpy", "load"): ("allow_pickle", False),
}


def unsafe_loads(source: str) -> list[int]:
    """Line numbers of ``torch.load``/``np.load`` calls without the safe keyword."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not isinstance(owner, ast.Name) or (owner.id, node.func.attr) not in SAFE:
            continue
        keyword, value = SAFE[(owner.id, node.func.attr)]
        passed = [k for k in node.keywords if k.arg == keyword]
        if not (
            passed and isinstance(passed[0].value, ast.Constant) and passed[0].value.value is value
        ):
            lines.append(node.lineno)
    return lines


def test_every_load_in_src_refuses_pickle() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(SRC)): unsafe_loads(f.read_text()) for f in files}
    assert {f: lines for f, lines in found.items() if lines} == {}
    assert "pickle.load" not in "".join(f.read_text() for f in files)


def test_the_check_catches_unsafe_calls() -> None:
    unsafe = "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p)\nnumpy.load(p, allow_pickle=True)\n"
    assert unsafe_loads(unsafe) == [1, 2, 3, 4]
    safe = "torch.load(p, weights_only=True)\nnp.load(p, mmap_mode='r', allow_pickle=False)\n"
    assert unsafe_loads(safe) == []
