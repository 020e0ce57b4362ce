"""The README's recipes are real: the cron line runs quietly, the Kubernetes manifests parse and their
command lines are accepted by the CLI."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from batch_export.cli import main
from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, sandbox_thread

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
KEY = "recipe-key-5c1e"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=2000, rate=None)) as sb:
        yield sb


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_the_cron_line_runs_silently_and_writes_metrics(sandbox: Sandbox, tmp_path: Path) -> None:
    line = next(x for x in code_blocks("cron")[0].splitlines() if x and not x.startswith("#"))
    command = line.split(None, 5)[5]  # drop the 5 schedule fields
    key_file, manifest = tmp_path / "key", tmp_path / "nightly.yaml"
    key_file.write_text(KEY + "\n")
    aoi = sandbox.catalog.aois[0]
    ins = aoi.insights[0]
    manifest.write_text(
        f"version: 1\napi: {{url: {sandbox.api_url}}}\nlimits: {{poll_interval: 0.05s}}\nexports:\n"
        f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", outputs: ["{ins.outputs[0]}"]}}\n'
    )
    metrics = tmp_path / "textfile" / "batch_export.prom"
    command = (
        command.replace("/etc/batch-export/key", str(key_file))
        .replace("/opt/batch-export/bin/batch-export", f"{sys.executable} -m batch_export")
        .replace("/srv/exports/nightly.yaml", str(manifest))
        .replace("/var/lib/node_exporter/textfile/batch_export.prom", str(metrics))
    )
    env = clean_env()
    proc = subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc.stderr == ""  # cron mails nothing on success
    names = {family.name for family in text_string_to_metric_families(metrics.read_text())}
    assert "batch_export_last_success_timestamp_seconds" in names
    assert len(list((tmp_path / "exports").rglob("*.zip"))) == 1  # exports/ beside the manifest


def test_kubernetes_manifests_parse_and_their_commands_are_valid() -> None:
    documents = [doc for block in code_blocks("yaml") for doc in yaml.safe_load_all(block)]
    kinds = {doc.get("kind") for doc in documents if isinstance(doc, dict)}
    assert {"CronJob", "Job"} <= kinds
    commands = []
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") not in ("CronJob", "Job"):
            continue
        spec = doc["spec"]
        pod = (spec["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else spec)["template"][
            "spec"
        ]
        for container in pod["containers"]:
            args = container["args"]
            if container.get("command") == ["sh", "-c"]:
                text = (
                    args[0].replace("$JOB_COMPLETION_INDEX", "3").replace("exec batch-export ", "")
                )
                args = shlex.split(text)
            commands.append(args)
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert env.get("PIXXEL_API_KEY_FILE", "").startswith("/secrets/")
    assert len(commands) == 2
    for args in commands:
        assert args[0] == "run"
        context = main.make_context("batch-export", list(args), resilient_parsing=False)
        sub = main.get_command(context, args[0])
        assert isinstance(sub, click.Command)
        sub.make_context("run", list(args[1:]))  # raises on an unknown or malformed option


def test_systemd_units_name_only_existing_options() -> None:
    block = code_blocks("ini")[0]
    exec_start = next(x for x in block.splitlines() if x.startswith("ExecStart="))
    args = shlex.split(exec_start.split("=", 1)[1])[1:]
    assert args[0] == "run"
    sub = main.get_command(click.Context(main), "run")
    assert sub is not None
    sub.make_context("run", args[1:])
    assert "SuccessExitStatus=3 75" in block


def test_every_error_code_the_client_writes_is_documented() -> None:
    import re as _re

    root = Path(__file__).resolve().parent.parent / "batch_export"
    codes = set()
    for path in root.glob("*.py"):
        text = path.read_text()
        codes |= set(_re.findall(r'code="([a-z_0-9]+)"', text))
        codes |= set(_re.findall(r'NetworkFault\(\s*"([a-z_0-9]+)"', text))
    missing = sorted(code for code in codes if f"`{code}`" not in README)
    assert missing == []
