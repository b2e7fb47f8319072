"""Every ```python block of README.md runs as written, each on its own (a
fresh namespace: a block must import and define what it uses), on the CPU.

A block that can only run on a GPU says so in a line ``# needs: cuda``; it
runs where CUDA is available and is skipped, with that reason, elsewhere.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str):
    """(first line number, source) of each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_extraction_finds_the_blocks():
    sample = "text\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(sample) == [(3, "x = 1\n"), (10, "y = 2\n")]
    # The README shows at least the usage snippet and the auto-choice example.
    assert len(BLOCKS) >= 2
    assert any("clipfast.clip_loss(" in source for _, source in BLOCKS)


@pytest.mark.parametrize("line,source", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, source):
    if "# needs: cuda" in source and not torch.cuda.is_available():
        pytest.skip(f"README.md:{line} needs CUDA")
    code = compile(source, f"README.md:{line}", "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - running the README is the test
