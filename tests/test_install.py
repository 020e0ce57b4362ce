"""README "Install for cron": the built wheel, installed into a fresh venv, runs from anywhere.

The wheel is built from this checkout and installed with ``pip install --no-index --no-deps`` into a
new venv in a temporary folder; the dependencies come from this project's venv through a ``.pth``
line placed after the fresh venv's own site-packages (no network at test time; the checkout itself is
not importable there). ``demo`` then runs from an unrelated working directory.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.fakes import clean_env

ROOT = Path(__file__).resolve().parent.parent

README = (ROOT / "README.md").read_text()


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_demo_from_another_folder(tmp_path: Path) -> None:
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "opt-batch-export", tmp_path / "cwd"
    elsewhere.mkdir()
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        dist,
        ROOT,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("batch_export-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(
        n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names
    )
    assert "batch_export/manifests/demo.yaml" in names and "batch_export/py.typed" in names

    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    fresh_python = venv / "bin" / "python"
    site = Path(
        run(
            fresh_python,
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            cwd=tmp_path,
        ).stdout.strip()
    )
    installed = run(venv / "bin" / "pip", "install", "--no-index", "--no-deps", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    (site / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = run(
        fresh_python, "-c", "import batch_export; print(batch_export.__file__)", cwd=elsewhere
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr

    proc = run(venv / "bin" / "batch-export", "demo", "--out", "exports", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    packages = sorted((elsewhere / "exports").rglob("*.zip"))
    assert len(packages) == 7
    assert all(zipfile.ZipFile(p).testzip() is None for p in packages)
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in packages}) == 7


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_documented_completion_scripts_exist(shell: str, tmp_path: Path) -> None:
    assert f"_BATCH_EXPORT_COMPLETE={shell}_source batch-export" in README
    proc = subprocess.run(
        [sys.executable, "-c", "from batch_export.cli import main; main(prog_name='batch-export')"],
        capture_output=True,
        text=True,
        env=clean_env(_BATCH_EXPORT_COMPLETE=f"{shell}_source"),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "_batch_export_completion" in proc.stdout, proc.stderr


def test_completion_offers_the_commands(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from batch_export.cli import main; main(prog_name='batch-export')"],
        capture_output=True,
        text=True,
        env=clean_env(
            _BATCH_EXPORT_COMPLETE="bash_complete", COMP_WORDS="batch-export st", COMP_CWORD="1"
        ),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.stdout.splitlines() == ["plain,status"]


def test_license_is_the_mit_text_pyproject_names() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()


def test_example_manifest_says_429s_do_not_count_against_retries() -> None:
    lines = (ROOT / "manifests" / "example.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("retries:"))
    comment = " ".join(line.split("#", 1)[1] for line in lines[start : start + 3] if "#" in line)
    assert "429" in comment and "never counts" in comment
    assert "for 429/" not in comment


def test_user_documentation_stands_alone() -> None:
    import batch_export

    for text in (
        README,
        batch_export.__doc__ or "",
        (ROOT / "manifests" / "example.yaml").read_text(),
        (ROOT / "manifests" / "demo.yaml").read_text(),
    ):
        assert "SPEC" not in text
