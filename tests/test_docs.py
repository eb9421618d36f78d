"""Every ```python block of the README and the docs runs, so none rots.

Blocks run in page order, each page in a fresh namespace and its own temporary working
directory. A block that cannot run offline or in seconds is marked by an HTML comment on the
line before it, ``<!-- skip: why -->``: it is reported as a skipped test with that reason,
never skipped silently. Shell commands use ```bash fences and are not run here.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import datatrace

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "examples" / "README.md", *(ROOT / "docs").rglob("*.md")]
)
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=indent)```\s*$", re.M | re.S
)
SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")
PYTHON_LINE = re.compile(r"^\s*(import \w|from [\w.]+ import )", re.M)


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, for a block marked <!-- skip: ... -->

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        indent = len(match.group("indent"))
        code = "\n".join(s[indent:] for s in match.group("body").splitlines())
        lang = match.group("info").strip().split(" ")[0]
        out.append(
            Block(str(path.relative_to(ROOT)), line, lang, code, skip and skip.group("reason"))
        )
    return out


BLOCKS = [b for page in PAGES for b in _blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
_namespaces: dict[str, dict[str, Any]] = {}
_failed: set[str] = set()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The snippets' models are tiny: intra-op threads only fight other jobs for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", [b for b in PYTHON if b.skip is None], ids=lambda b: b.id)
def test_python_block_runs(block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch):
    if block.page in _failed:
        pytest.fail(f"an earlier block of {block.page} failed, and this one builds on it")
    if block.page not in _namespaces:
        torch.manual_seed(0)
        name = "datatrace_docs_" + re.sub(r"\W", "_", block.page)
        # a real module, so that classes defined on the page work (dataclasses look it up)
        module = sys.modules[name] = types.ModuleType(name)
        module.__dict__["__workdir__"] = tmp_path_factory.mktemp(name)
        _namespaces[block.page] = module.__dict__
    namespace = _namespaces[block.page]
    monkeypatch.chdir(namespace["__workdir__"])
    # the first code line is the fence's next line: tracebacks point into the page
    code = compile("\n" * block.line + block.code, str(ROOT / block.page), "exec")
    try:
        exec(code, namespace)
    except BaseException:
        _failed.add(block.page)
        raise


@pytest.mark.parametrize("block", [b for b in PYTHON if b.skip is not None], ids=lambda b: b.id)
def test_python_block_marked_skip(block: Block):
    assert block.skip, f"{block.id}: a skip marker needs a reason: <!-- skip: why -->"
    pytest.skip(f"{block.id}: {block.skip}")


def test_every_block_is_python_run_or_skipped_or_not_python():
    # Python in another fence would never run: it must be a ```python block (or say why not)
    hidden = [
        b.id
        for b in BLOCKS
        if b.lang != "python" and PYTHON_LINE.search(b.code) and "python -c" not in b.code
    ]
    assert hidden == []
    stray = [b.id for b in BLOCKS if b.skip is not None and b.lang != "python"]
    assert stray == []  # a skip marker before a shell block is a mistake
    assert len([b for b in PYTHON if b.skip is None]) >= 40  # a parsing regression finds none


def test_every_public_name_has_an_api_entry():
    api = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: datatrace\.(\w+)\s*$", api, re.M))
    assert sorted(set(datatrace.__all__) - documented) == []


def test_every_method_id_has_a_section():
    index = (ROOT / "docs" / "methods" / "index.md").read_text()
    linked = dict(re.findall(r"\[`([\w-]+)`\]\((\S+?\.md#[\w-]+)\)", index))
    assert sorted(set(datatrace.METHODS) - set(linked)) == []
    for method_id, target in linked.items():
        page, anchor = target.split("#")
        text = (ROOT / "docs" / "methods" / page).read_text()
        assert f"{{#{anchor}}}" in text, f"{page} has no section {{#{anchor}}} for {method_id}"
