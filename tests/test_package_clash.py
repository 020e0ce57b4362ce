"""A package never overwrites a file the run itself reads or writes (SPEC §3: the collision check).

With ``output.dir: "."`` and ``output.path: "{name}"``, an entry named like the manifest was
downloaded onto the manifest (the next run then read a zip as the manifest: exit 2 for ever); the
same held for the API key file. ``--report``/``--metrics-file`` onto a package were refused, the
other way round was not checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes import cli_in_process


def manifest_text(name: str, *, key_file: str | None = None) -> str:
    api = f', key_file: "{key_file}"' if key_file else ""
    return (
        f'version: 1\napi: {{url: "http://127.0.0.1:9"{api}}}\n'  # nothing listens: no request
        'output: {dir: ".", path: "{name}"}\nexports:\n'
        f'  - {{aoi_id: "a1", insight_id: "i1", outputs: ["o"], name: "{name}"}}\n'
    )


@pytest.mark.parametrize("suffix", ["", ".part"], ids=["package", "its-part"])
def test_a_package_onto_the_manifest_is_refused(tmp_path: Path, suffix: str) -> None:
    manifest = tmp_path / f"m.yaml{suffix}"
    text = manifest_text(manifest.name.removesuffix(".part") if suffix else manifest.name)
    manifest.write_text(text)
    result = cli_in_process(["run", manifest.name], env={"PIXXEL_API_KEY": "k"}, cwd=tmp_path)
    assert result.returncode == 2
    what = "its .part " if suffix else ""
    assert result.stderr.splitlines() == [
        f"batch-export: export a1/i1 ({manifest.name.removesuffix('.part')}) would write "
        f"{what}onto the manifest {manifest.absolute()}; change its name or output.path"
    ]
    assert manifest.read_text() == text
    assert not (tmp_path / ".batch-export").exists()


def test_a_package_onto_the_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("secret-key-value\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(manifest_text("key.txt", key_file="key.txt"))
    result = cli_in_process(["run", str(manifest)], env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"batch-export: export a1/i1 (key.txt) would write onto the API key file "
        f"{tmp_path / 'key.txt'}; change its name or output.path"
    ]
    assert (tmp_path / "key.txt").read_text() == "secret-key-value\n"
    assert "secret-key-value" not in result.stderr + result.stdout


def test_a_package_onto_the_key_file_from_the_environment_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key.txt"
    key.write_text("secret-key-value\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(manifest_text("key.txt"))
    result = cli_in_process(
        ["run", str(manifest)], env={"PIXXEL_API_KEY_FILE": str(key)}, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "would write onto the API key file" in result.stderr
    assert key.read_text() == "secret-key-value\n"


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]])
def test_validate_and_dry_run_refuse_it_too(tmp_path: Path, command: list[str]) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(manifest_text("m.yaml"))
    result = cli_in_process([*command, "m.yaml"], env={"PIXXEL_API_KEY": "k"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"batch-export: export a1/i1 (m.yaml) would write onto the manifest {manifest}; "
        "change its name or output.path"
    ]
    assert result.stdout == ""


def test_a_discovered_package_onto_the_manifest_fails_path_clash(tmp_path: Path) -> None:
    # Known only once listed: the job fails path_clash, the others go ahead, nothing overwritten.
    import json

    from batch_export.sandbox import SandboxConfig
    from tests.fakes import sandbox_thread

    with sandbox_thread(SandboxConfig(keys=("k",), asset_size=500, rate=None)) as sandbox:
        aoi = sandbox.catalog.aois[0]
        insight = next(i for i in aoi.insights if i.status == "completed" and not i.deleted_at)
        manifest = tmp_path / "m.yaml"
        text = (
            f'version: 1\napi: {{url: "{sandbox.api_url}"}}\n'
            'output: {dir: ".", path: "{name}"}\ndiscover:\n'
            f'  - {{aois: ["{aoi.id}"], name_glob: "{insight.name}", outputs: all, '
            'name: "m.yaml"}\n'
        )
        manifest.write_text(text)
        report = tmp_path / "r.json"
        args = ["run", "m.yaml", "--report", str(report), "--no-progress"]
        result = cli_in_process(args, env={"PIXXEL_API_KEY": "k"}, cwd=tmp_path)
        puts = sandbox.requests_to("api", "PUT")
    assert result.returncode == 1, result.stderr
    assert manifest.read_text() == text
    (job,) = json.loads(report.read_text())["jobs"]
    assert (job["outcome"], job["error"]["code"]) == ("failed", "path_clash")
    assert job["error"]["message"] == (
        f"export {aoi.id}/{insight.id} (m.yaml) would write onto the manifest {manifest}; "
        "change its name or output.path"
    )
    assert puts == []  # failed before any request
