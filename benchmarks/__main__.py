"""``python -m benchmarks [--only SECTION,...] [--no-write] [--strict]``: run, print the table.

Sections: ``orchestration``, ``transfer`` (throughput, CPU, memory; needs nginx), ``scale``, ``s3`` (1 GiB
upload to a local S3 server against rclone). Writes
``benchmarks/RESULTS.md`` (date, machine, figures, targets met or missed) unless ``--no-write`` or
``--only`` is given. Exit status 1 when a section crashed (or, with ``--strict``, a target is
missed), else 0: a missed target is a finding to report, not a broken benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import orchestration, s3upload, scale, transfer
from benchmarks._common import Figure, log, machine

SECTIONS: dict[str, Callable[[], list[Figure]]] = {
    "orchestration": orchestration.run,
    "transfer": transfer.run,
    "scale": scale.run,
    "s3": s3upload.run,
}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def table(figures: list[Figure]) -> list[str]:
    """The figures as a Markdown table."""
    lines = [
        "| section | figure | value | target | verdict | detail |",
        "|---|---|---:|---|---|---|",
    ]
    for f in figures:
        note = f.note.replace("|", "/")
        lines.append(
            f"| {f.section} | {f.name} | {f.shown()} | {f.target or '-'} | {f.verdict} | {note} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections; print and (for a full run) write the results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", help="comma-separated sections: " + ", ".join(SECTIONS))
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    chosen = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")
    started = time.perf_counter()
    load_before = os.getloadavg()
    figures: list[Figure] = []
    crashed = False
    for name in chosen:
        section_started = time.perf_counter()
        try:
            figures += SECTIONS[name]()
        except Exception as exc:  # one broken section must not hide the others' figures
            traceback.print_exc()
            crashed = True
            figures.append(Figure(name, "section failed", 0, "", "runs", False, repr(exc)[:300]))
        log(f"{name}: {time.perf_counter() - section_started:.0f} s")
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    info = machine()
    missed = [f for f in figures if f.met is False]
    head = [
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"Machine: {info['nproc']} cores, {info['cpu']}, {info['memory']} RAM, "
        f"{info['python']}, Linux {info['kernel']}",
        f"Load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        "(the machine is shared: other work adds noise)",
        f"Benchmark time: {elapsed:.0f} s",
        f"Targets: {sum(1 for f in figures if f.met)} met, {len(missed)} missed",
    ]
    print()
    print("\n".join(head))
    print()
    print("\n".join(table(figures)))
    if missed:
        print(
            "\nMISSED: " + "; ".join(f"{f.name} = {f.shown()} (target {f.target})" for f in missed)
        )
    if not args.no_write and not args.only:
        RESULTS.write_text(
            "# Benchmark results\n\n"
            "Written by `make bench` (`python -m benchmarks`); see `benchmarks/__init__.py` for\n"
            "what each section measures and how.\n\n"
            + "\n".join(f"- {line}" for line in head)
            + "\n\n"
            + "\n".join(table(figures))
            + "\n"
        )
        log(f"wrote {RESULTS}")
    return 1 if crashed or (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
