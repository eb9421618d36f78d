"""The README's Layout section names every module and package of ``src/datatrace`` (issue 17)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "datatrace"


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    end = text.find("\n## ", start + 1)  # the last section runs to the end
    end = len(text) if end < 0 else end
    return " ".join(text[start:end].split())  # names may wrap across lines


def test_layout_names_every_top_level_module_and_package():
    layout = _layout()
    missing = []
    for path in sorted(PACKAGE.iterdir()):
        if path.name.startswith("__") or path.name == "py.typed":
            continue
        if path.is_dir() and (path / "__init__.py").exists():
            name = f"`{path.name}/`"
        elif path.suffix == ".py":
            name = f"`{path.name}`"
        else:
            continue
        if name not in layout:
            missing.append(name)
    assert not missing, f"README Layout does not mention {missing}"


def test_layout_names_every_file_of_methods_but_the_methods_themselves():
    """Each method's own file is covered by "one file per method"; the rest are named."""
    layout = _layout()
    files = [
        p.name
        for p in (PACKAGE / "methods").glob("*.py")
        if not p.name.startswith("__") and "@register(" not in p.read_text()
    ]
    missing = [f for f in files if f"`{f}`" not in layout and f"`{f[:-3]}`" not in layout]
    assert not missing, f"README Layout does not mention methods/{missing}"
