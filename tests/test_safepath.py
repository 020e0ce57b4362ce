"""Nothing the downloader creates, opens, renames or removes follows a planted link (issue 10).

Every place is tried: the folders below the output dir, the ``.part`` (single stream and segmented),
verification, the rename onto the final name and the removal of a ``.part``; and a verification that
cannot open its file (EMFILE) is about the process, never a bad zip.
"""

from __future__ import annotations

import errno
import io
import os
import zipfile
from pathlib import Path

import pytest

from batch_export import partfile
from batch_export.errors import LocalIOError, VerificationError
from batch_export.partfile import commit_part, discard_part
from batch_export.safepath import PathProblem, open_dir, open_file
from batch_export.segments import SegmentState
from batch_export.types import Transfer
from batch_export.verify import verify_package


def a_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("a.tif", b"x" * 5000)
    return buffer.getvalue()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside"
    target.mkdir()
    (target / "precious").write_bytes(b"precious")
    return target


def test_a_symlinked_folder_below_the_output_dir_is_refused(out: Path, outside: Path) -> None:
    (out / "aoi").symlink_to(outside)
    with pytest.raises(PathProblem) as caught:
        open_dir(out / "aoi" / "insight", out)
    assert caught.value.code == "path_escape"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]  # nothing made there


def test_a_file_where_a_folder_should_be_is_a_path_clash(out: Path) -> None:
    (out / "aoi").write_bytes(b"")
    with pytest.raises(PathProblem) as caught:
        open_dir(out / "aoi" / "insight", out)
    assert caught.value.code == "path_clash"


def test_the_output_dir_itself_may_be_a_symlink(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(outside)
    fd = open_dir(link / "a" / "b", link)
    os.close(fd)
    assert (outside / "a" / "b").is_dir()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
@pytest.mark.parametrize("segmented", [False, True])
def test_a_planted_part_is_replaced_and_what_it_points_at_untouched(
    out: Path, outside: Path, kind: str, segmented: bool
) -> None:
    part = out / "pkg.zip.part"
    precious = outside / "precious"
    if kind == "symlink":
        part.symlink_to(precious)
    elif kind == "hardlink":
        os.link(precious, part)
    else:
        os.mkfifo(part)
    if segmented:
        sink = partfile.RangeSink(part, out, SegmentState(6, ((0, 3),)), md5=False)
        sink.write(0, memoryview(b"abcdef"))
        assert not sink.kept
        sink.close()
    else:
        plain = partfile.PartSink(part, 3, md5=False, root=out)
        assert plain.size == 0  # nothing of it was kept for a resume
        plain.write(b"abcdef")
        plain.close()
    assert precious.read_bytes() == b"precious"
    assert not part.is_symlink() and part.read_bytes() == b"abcdef"
    assert os.stat(part).st_nlink == 1


def test_a_folder_at_the_part_name_is_a_path_clash(out: Path) -> None:
    (out / "pkg.zip.part").mkdir()
    fd = open_dir(out, out)
    try:
        with pytest.raises(PathProblem) as caught:
            open_file(fd, "pkg.zip.part", keep=True)
    finally:
        os.close(fd)
    assert caught.value.code == "path_clash"


def test_commit_replaces_a_symlink_at_the_final_name_instead_of_writing_through_it(
    out: Path, outside: Path
) -> None:
    part, final = out / "pkg.zip.part", out / "pkg.zip"
    part.write_bytes(b"package")
    final.symlink_to(outside / "precious")
    commit_part(part, final, root=out)
    assert (outside / "precious").read_bytes() == b"precious"
    assert not final.is_symlink() and final.read_bytes() == b"package"


def test_commit_through_a_symlinked_folder_is_refused(out: Path, outside: Path) -> None:
    (outside / "pkg.zip.part").write_bytes(b"package")
    (out / "aoi").symlink_to(outside)
    with pytest.raises(LocalIOError) as caught:
        commit_part(out / "aoi" / "pkg.zip.part", out / "aoi" / "pkg.zip", root=out)
    assert caught.value.code == "path_escape"
    assert not (outside / "pkg.zip").exists()


def test_discard_removes_a_planted_symlink_not_its_target(out: Path, outside: Path) -> None:
    part = out / "pkg.zip.part"
    part.symlink_to(outside / "precious")
    discard_part(part, root=out)
    assert not part.is_symlink() and not part.exists()
    assert (outside / "precious").read_bytes() == b"precious"


def test_verification_never_reads_through_a_symlinked_part(out: Path, outside: Path) -> None:
    good = outside / "good.zip"
    good.write_bytes(a_zip())
    part = out / "pkg.zip.part"
    part.symlink_to(good)
    with pytest.raises(LocalIOError):
        verify_package(part, Transfer(size=good.stat().st_size))


def test_running_out_of_descriptors_while_verifying_is_no_bad_zip(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = out / "pkg.zip.part"
    data = a_zip()
    part.write_bytes(data)
    verify_package(part, Transfer(size=len(data)))  # a good package

    def no_descriptors(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(partfile.os, "open", no_descriptors)
    with pytest.raises(LocalIOError) as caught:
        verify_package(part, Transfer(size=len(data)))
    assert not isinstance(caught.value, VerificationError)
    assert caught.value.code == "too_many_open_files"
