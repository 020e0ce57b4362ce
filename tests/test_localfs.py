"""The staging dir of an object-store output must be on a local file system (SPEC §8)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from batch_export import localfs
from batch_export.cli import main
from batch_export.errors import UsageError


def test_a_folder_of_this_machine_is_local_and_one_not_made_yet_is_judged_by_its_parent(
    tmp_path: Path,
) -> None:
    assert localfs.remote_file_system(tmp_path) is None
    assert localfs.remote_file_system(tmp_path / "not" / "made" / "yet") is None


@pytest.mark.parametrize(
    ("f_type", "name"),
    [(0x6969, "NFS"), (0xFF534D42, "CIFS"), (0xFE534D42, "SMB2"), (0x65735546, "FUSE")],
)
def test_network_and_fuse_file_systems_are_named(
    f_type: int, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []

    def statfs(path: Path) -> int:
        seen.append(path)
        return f_type

    monkeypatch.setattr(localfs, "_f_type", statfs)
    assert localfs.remote_file_system(tmp_path / "staging") == name
    assert seen == [tmp_path]  # the nearest folder that exists


def test_run_refuses_a_staging_dir_on_nfs_with_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = tmp_path / "nfs-share" / "staging"
    (tmp_path / "local").mkdir()  # the state dir's disk (the state dir must be local too)
    asked: list[Path] = []

    def statfs(path: Path) -> int:
        asked.append(path)
        return 0x6969 if path == tmp_path else 0xEF53

    monkeypatch.setattr(localfs, "_f_type", statfs)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        'version: 1\nexports:\n  - {aoi_id: "a1", insight_id: "i1", outputs: ["o"]}\n'
    )
    monkeypatch.setenv("PIXXEL_API_KEY", "k")
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(manifest),
            "--api-url",
            "http://127.0.0.1:9",  # nothing listens: no request may be sent
            "--out",
            "s3://bucket/nightly",
            "--staging-dir",
            str(staging),
            "--state-dir",
            str(tmp_path / "local" / "state"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"batch-export: the staging dir {staging} is on NFS, not a local file system: packages are "
        "verified there before the upload (SPEC §8); choose a folder on a local disk "
        "(--staging-dir)"
    ]
    assert tmp_path in asked
    assert not staging.exists()


def test_run_refuses_a_state_dir_on_nfs_with_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite's WAL and locks, and the state dir's flock, are unsafe on a network file system
    # (SPEC §5): the default state dir <out>/.batch-export of an output on NFS is refused too.
    share = tmp_path / "share"
    share.mkdir()
    asked: list[Path] = []

    def statfs(path: Path) -> int:
        asked.append(path)
        return 0x6969 if path == share else 0xEF53

    monkeypatch.setattr(localfs, "_f_type", statfs)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        'version: 1\nexports:\n  - {aoi_id: "a1", insight_id: "i1", outputs: ["o"]}\n'
    )
    monkeypatch.setenv("PIXXEL_API_KEY", "k")
    args = ["run", str(manifest), "--api-url", "http://127.0.0.1:9", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--out", str(share)])
    assert result.exit_code == 2, result.output
    state = share / ".batch-export"
    assert result.stderr.strip().splitlines() == [
        f"batch-export: the state dir {state} is on NFS, not a local file system: SQLite's "
        "locks and write-ahead log are unsafe there (SPEC §5); give --state-dir a folder on a "
        "local disk (the output may stay where it is)"
    ]
    assert share in asked
    assert not state.exists()  # nothing made, nothing requested (port 9: nothing listens)


def test_a_state_dir_on_a_local_disk_passes_beside_an_output_on_nfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    monkeypatch.setattr(localfs, "_f_type", lambda path: 0x6969 if path == share else 0xEF53)
    localfs.check_local_state_dir(tmp_path / "state")  # no error
    with pytest.raises(UsageError, match=r"the state dir .* is on NFS"):
        localfs.check_local_state_dir(share / "state")
