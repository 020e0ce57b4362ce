"""keep_freed_memory: glibc keeps freed heap memory instead of trimming it at once."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from batch_export.allocator import TRIM_THRESHOLD, keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# In a fresh interpreter (the setting is process-wide): allocate 24 MiB in 256 KiB objects, the
# size of a socket read, free them, and print the free bytes glibc keeps in its heap
# (mallinfo2().fordblks, glibc >= 2.33).
_PROBE = """
import ctypes, sys
from batch_export.allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory({})
for _ in range(3):
    chunks = [bytes(256 * 1024) for _ in range(96)]
    del chunks
print(libc.mallinfo2().fordblks)
"""


def _free_after(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@glibc
def test_freed_socket_sized_buffers_stay_in_the_heap() -> None:
    kept = _free_after("keep")
    assert 20 * 1024 * 1024 <= kept <= TRIM_THRESHOLD  # the 24 MiB, not handed back
    assert _free_after("default") < 4 * 1024 * 1024  # glibc's defaults trim them (or mmap)


@glibc
@pytest.mark.parametrize(
    "environ",
    [{"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, {"MALLOC_ARENA_MAX": "2"}],
)
def test_the_operators_own_allocator_settings_win(environ: dict[str, str]) -> None:
    assert keep_freed_memory(environ) is False


def test_the_python_api_leaves_the_allocator_alone() -> None:
    import ast
    from pathlib import Path

    import batch_export

    package = Path(batch_export.__file__).parent
    callers = sorted(
        path.name
        for path in package.rglob("*.py")
        if any(
            isinstance(node, ast.Call) and getattr(node.func, "id", "") == "keep_freed_memory"
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert callers == ["cli.py"]  # process-wide, so the CLI only
