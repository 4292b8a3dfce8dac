"""The runnable examples in the docs run (each ```python block of these pages, in a fresh
namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["serving.md", "pbatch.md", "bsq.md", "any_precision.md"]


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run(page: str) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    assert blocks, f"docs/{page} has no python example"
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), {"__name__": "__docs__"})
