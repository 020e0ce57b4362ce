"""The state-dir collision check (SPEC §3) gives the verdicts of its straightforward definition."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from hypothesis import given, settings
from hypothesis import strategies as st

from batch_export.config import state_dir_clash
from batch_export.manifest import ExportSpec
from batch_export.types import STATE_ENTRIES

OUT = Path("/srv/exports")
NAMES = [".batch-export", "reports", "lock", "state.sqlite3", "state.sqlite3-wal", "a", "b.zip"]


def reference(specs: tuple[ExportSpec, ...], state_dir: Path) -> str | None:
    """The definition, path by path and parent by parent (slow at 100,000 exports)."""
    try:
        rel = PurePosixPath(state_dir.relative_to(OUT).as_posix())
    except ValueError:
        return None
    reserved = {rel / entry for entry in STATE_ENTRIES}
    for spec in specs:
        for path in (PurePosixPath(spec.relpath), PurePosixPath(spec.relpath + ".part")):
            if path in reserved or any(parent in reserved for parent in path.parents):
                return "inside"
            if path == rel or path in rel.parents:
                return "lies on"
    return None


def verdict(message: str | None) -> str | None:
    if message is None:
        return None
    return "inside" if "inside the state dir" in message else "lies on"


relpaths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=4).map("/".join)
state_dirs = st.one_of(
    st.just(OUT),
    st.just(Path("/elsewhere/state")),
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(lambda p: OUT.joinpath(*p)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(relpaths, min_size=1, max_size=5), state_dirs)
def test_clash_verdicts_match_the_definition(paths: list[str], state_dir: Path) -> None:
    specs = tuple(ExportSpec("aoi", "ins", (), ("o",), "n", path) for path in paths)
    assert verdict(state_dir_clash(specs, out_dir=OUT, state_dir=state_dir)) == reference(
        specs, state_dir
    )


def test_a_package_under_the_reports_folder_is_refused() -> None:
    specs = (ExportSpec("aoi", "ins", (), ("o",), "n", ".batch-export/reports/x.zip"),)
    message = state_dir_clash(specs, out_dir=OUT, state_dir=OUT / ".batch-export")
    assert message is not None and "inside the state dir" in message
