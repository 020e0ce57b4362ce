"""Run configuration: command line > manifest > defaults, the API key, and checks made before any request.

Everything here is decided before the first request: a problem is a :class:`UsageError` (exit 2),
and nothing has been sent.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final

from batch_export.errors import UsageError
from batch_export.lifecycle import job_key, shard_of
from batch_export.manifest import ExportSpec, Manifest, api_url_problem, limit_bounds
from batch_export.types import (
    DEFAULT_API_URL,
    DEFAULT_KEY_ENV,
    KEY_FILE_ENV,
    STATE_DIR_NAME,
    STATE_ENTRIES,
    Settings,
    StatusVocabulary,
)
from batch_export.urls import url_refusal

if TYPE_CHECKING:
    from batch_export.objectstore import StoreUrl

__all__ = [
    "RunOptions",
    "check_options",
    "check_writable",
    "chosen_out_url",
    "key_files",
    "output_file_clash",
    "package_file_clash",
    "package_file_clashes",
    "parse_output_url",
    "parse_shard",
    "resolve_api_key",
    "resolve_dirs",
    "resolve_settings",
    "select_shard",
    "state_dir_clash",
    "state_dir_links",
]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Command-line options of ``run``; ``None`` means "not given" (manifest or default applies)."""

    api_url: str | None = None
    out: Path | None = None
    state_dir: Path | None = None
    in_flight: int | None = None
    downloads: int | None = None
    rate: float | None = None
    force: bool = False
    dry_run: bool = False
    report: Path | None = None
    progress: bool | None = None
    verbosity: int = 0
    allow_http: bool = False
    max_runtime: float | None = None  # seconds
    shard: tuple[int, int] | None = None  # (K, N): only jobs with int(key[:16], 16) % N == K
    log_format: str = "text"  # or "json"
    metrics_file: Path | None = None
    api_key: str | None = None  # given directly (demo); otherwise from the environment
    connections: int | None = None  # parallel range connections per download
    segment_min: int | None = None  # bytes: smallest package fetched over several connections
    progress_interval: float = 60.0  # seconds between progress lines when stderr is no terminal
    out_url: str | None = None  # --out s3://bucket/prefix (then ``out`` is None)
    staging_dir: Path | None = None  # object-store output: where packages are verified first
    check_existing: bool = False  # HEAD done objects (object store) before skipping them
    retry_abandoned: bool = False  # request abandoned jobs again


def resolve_settings(manifest: Manifest, options: RunOptions) -> Settings:
    """Merge command line > manifest > defaults into :class:`Settings`.

    Raises:
        UsageError: the API URL is not allowed (plain http to a non-loopback host without
            ``--allow-http``), or a number is out of range.
    """
    limits = manifest.limits
    check_options(options)
    api_url = options.api_url or manifest.api.url or DEFAULT_API_URL
    refusal = url_refusal(api_url, allow_http=options.allow_http, what="API URL")
    if refusal:
        raise UsageError(refusal)
    out_dir, state_dir = resolve_dirs(
        manifest,
        out=options.out,
        state_dir=options.state_dir,
        out_url=options.out_url,
        staging_dir=options.staging_dir,
    )
    out_url = chosen_out_url(manifest, out=options.out, out_url=options.out_url)
    defaults = Settings(api_url="", out_dir=out_dir, state_dir=state_dir)

    def pick(cli: float | int | None, man: float | int | None, default: float | int) -> float | int:
        return cli if cli is not None else man if man is not None else default

    settings = Settings(
        api_url=api_url.rstrip("/"),
        out_dir=out_dir,
        state_dir=state_dir,
        in_flight=int(pick(options.in_flight, limits.in_flight, defaults.in_flight)),
        downloads=int(pick(options.downloads, limits.downloads, defaults.downloads)),
        rate=float(pick(options.rate, limits.rate, defaults.rate)),
        poll_interval=float(pick(None, limits.poll_interval, defaults.poll_interval)),
        poll_max_interval=float(pick(None, limits.poll_max_interval, defaults.poll_max_interval)),
        poll_timeout=float(pick(None, limits.poll_timeout, defaults.poll_timeout)),
        retries=int(pick(None, limits.retries, defaults.retries)),
        read_timeout=float(pick(None, limits.read_timeout, defaults.read_timeout)),
        vocabulary=StatusVocabulary.from_lists(
            manifest.api.ready_statuses, manifest.api.failed_statuses
        ),
        allow_http=options.allow_http,
        force=options.force,
        connections=int(pick(options.connections, limits.connections, defaults.connections)),
        segment_min=int(pick(options.segment_min, limits.segment_min, defaults.segment_min)),
        out_url=out_url,
        check_existing=options.check_existing,
        give_up_after=int(pick(None, limits.give_up_after, defaults.give_up_after)),
        retry_abandoned=options.retry_abandoned,
    )
    if settings.poll_max_interval < settings.poll_interval:
        settings = replace(settings, poll_max_interval=settings.poll_interval)
    if settings.in_flight < 1 or settings.downloads < 1 or not settings.rate > 0:
        raise UsageError("--in-flight and --downloads must be >= 1 and --rate > 0")
    if settings.connections < 1 or settings.segment_min < 1:
        raise UsageError("--connections and segment_min must be >= 1")
    clash = state_dir_clash(
        manifest.exports, out_dir=settings.out_dir, state_dir=settings.state_dir
    )
    if clash:
        raise UsageError(clash)
    return settings


#: Run options checked against the range of their manifest key (``limits.<name>``).
_BOUNDED: Final = (
    ("in_flight", "--in-flight"),
    ("downloads", "--downloads"),
    ("connections", "--connections"),
    ("segment_min", "segment_min"),
)


def check_options(options: RunOptions) -> None:
    """Check each option value exactly as the manifest checks its key (CLI, environment, Python API).

    Raises:
        UsageError: one line naming the option; an API URL's value is never quoted (it may
            hold a password or a token).
    """
    if options.api_url is not None:
        problem = api_url_problem(options.api_url)
        if problem is not None:
            raise UsageError(
                f"--api-url / BATCH_EXPORT_API_URL / api_url: the API URL {problem} "
                "(value not shown)"
            )
    for name, option in _BOUNDED:
        value = getattr(options, name)
        low, high = limit_bounds(name)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        ):
            raise UsageError(f"{option} must be an integer from {low} to {high}, got {value!r}")
    if options.rate is not None and not (
        isinstance(options.rate, int | float) and options.rate > 0 and math.isfinite(options.rate)
    ):
        raise UsageError(f"--rate must be a number of requests/s above 0, got {options.rate!r}")
    for name, seconds in (("--max-runtime", options.max_runtime),):
        if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
            raise UsageError(f"{name} must be a duration above 0, got {seconds!r} s")


def chosen_out_url(manifest: Manifest, *, out: Path | None, out_url: str | None) -> str | None:
    """Return the object-store output URL the run writes to (normalised), or None for a folder.

    ``--out`` wins over the manifest's ``output.dir``, whichever of the two is a URL.

    Raises:
        UsageError: a URL this build cannot write (``gs://``, ``az://``, …) or a malformed one.
    """
    text = out_url if out_url is not None else None if out is not None else manifest.out_url
    if text is None:
        return None
    url = parse_output_url(text)
    return str(url) if url is not None else None


def parse_output_url(text: str) -> StoreUrl | None:
    """Parse an output URL (:func:`batch_export.objectstore.parse_store_url`); None for a folder.

    The object-store client (botocore) is loaded only for a URL: a folder output starts ~0.3 s
    faster.

    Raises:
        UsageError: a URL this build cannot write, or a malformed one.
    """
    if "://" not in text:
        return None
    from batch_export.objectstore import parse_store_url

    return parse_store_url(text)


def resolve_dirs(
    manifest: Manifest,
    *,
    out: Path | None,
    state_dir: Path | None,
    out_url: str | None = None,
    staging_dir: Path | None = None,
) -> tuple[Path, Path]:
    """Return the run's ``(output dir, state dir)``, absolute (SPEC §2; ``status`` uses it too).

    ``out``: ``--out`` (relative to the working dir), else the manifest's ``output.dir`` (already
    resolved against the manifest's folder), else ``exports/`` beside the manifest. ``state_dir``:
    ``--state-dir``, else ``<out>/.batch-export``. For an object-store output (``out_url``, or the
    manifest's ``s3://`` ``output.dir``) the output dir is the local staging dir and the state dir
    defaults to ``<manifest folder>/.batch-export/<scheme>/<bucket>/<prefix>`` (SPEC §8).

    Raises:
        UsageError: an object-store URL this build cannot write.
    """
    url_text = chosen_out_url(manifest, out=out, out_url=out_url)
    if url_text is not None:
        from batch_export.objectstore import object_output_dirs

        url = parse_output_url(url_text)
        assert url is not None
        return object_output_dirs(
            url, manifest_path=manifest.path, state_dir=state_dir, staging_dir=staging_dir
        )
    if out is not None:
        out_dir = out.absolute()
    elif manifest.output.dir is not None:
        out_dir = manifest.output.dir
    else:
        out_dir = manifest.path.absolute().parent / "exports"
    return out_dir, state_dir.absolute() if state_dir else out_dir / STATE_DIR_NAME


def state_dir_clash(specs: tuple[ExportSpec, ...], *, out_dir: Path, state_dir: Path) -> str | None:
    """Return why the state dir and some package path collide, or None (SPEC §3 collision check).

    A package (or its ``.part``) must not land on a state-dir entry, and the state dir must not lie
    on or under a package's path.
    """
    try:
        rel = PurePosixPath(state_dir.absolute().relative_to(out_dir.absolute()).as_posix())
    except ValueError:
        return None  # the state dir is outside the output dir
    # Compared as tuples of parts, one parse per path: 100,000 exports take 0.6 s, not 3 s.
    rel_parts = rel.parts
    depth = len(rel_parts) + 1  # every reserved entry is one name inside the state dir
    reserved = {(*rel_parts, entry) for entry in STATE_ENTRIES}
    for spec in specs:
        for path in (PurePosixPath(spec.relpath), PurePosixPath(spec.relpath + ".part")):
            parts = path.parts
            if parts[:depth] in reserved:  # a reserved entry, or under one
                return (
                    f"export {spec.aoi_id}/{spec.insight_id} ({spec.name}) would write "
                    f"{out_dir / path}, inside the state dir {state_dir}; choose another "
                    "--state-dir or output.path"
                )
            if parts == rel_parts[: len(parts)]:  # the state dir itself, or one of its parents
                return (
                    f"the state dir {state_dir} lies on the path of export {spec.aoi_id}/"
                    f"{spec.insight_id} ({spec.name}); choose another --state-dir"
                )
    return None


def output_file_clash(
    files: dict[str, Path],
    *,
    specs: tuple[ExportSpec, ...],
    settings: Settings,
    manifest_path: Path,
) -> str | None:
    """Return why one of the run's own output files would overwrite something, or None.

    ``files`` maps an option (``"--report"``, ``"--metrics-file"``) to its path. None of them may be
    the manifest, a state-dir entry (the state store and its journal files, the lock, the reports
    folder), a package or its ``.part``, or another of these files.
    """
    state_dir = settings.state_dir
    taken = {_same_file_key(manifest_path): f"the manifest {manifest_path}"}
    for entry in STATE_ENTRIES:
        taken[_same_file_key(state_dir / entry)] = f"{entry} in the state dir {state_dir}"
    for option, path in files.items():
        key = _same_file_key(path)
        if key in taken:
            return f"{option} {path} would overwrite {taken[key]}; choose another path"
        taken[key] = f"the {option} file"
    # Compared as paths relative to the output dir: one dict of 100,000 names, no system call each.
    outs = {settings.out_dir.absolute(), Path(_same_file_key(settings.out_dir))}
    by_relpath = {spec.relpath: spec for spec in specs}
    for option, path in files.items():
        for candidate in {path.absolute(), Path(_same_file_key(path))}:
            for out in outs:
                if not candidate.is_relative_to(out):
                    continue
                rel = candidate.relative_to(out).as_posix()
                spec = by_relpath.get(rel) or by_relpath.get(rel.removesuffix(".part"))
                if spec is not None:
                    return (
                        f"{option} {path} would overwrite the package of export "
                        f"{spec.aoi_id}/{spec.insight_id} ({spec.name}); choose another path"
                    )
    return None


def package_file_clash(
    protected: list[tuple[str, Path]], *, specs: Sequence[ExportSpec], settings: Settings
) -> str | None:
    """Return why a package (or its ``.part``) would overwrite one of the run's own files, or None.

    ``protected`` pairs a description (``"the manifest"``, ``"the API key file"``) with a file the
    run reads; with ``output.dir: "."`` and ``output.path: "{name}"`` an entry named like it would be
    downloaded onto it. The first of :func:`package_file_clashes`.
    """
    clashes = package_file_clashes(protected, specs=specs, settings=settings)
    return clashes[min(clashes)] if clashes else None


def package_file_clashes(
    protected: list[tuple[str, Path]], *, specs: Sequence[ExportSpec], settings: Settings
) -> dict[int, str]:
    """Every spec (index into ``specs``) whose package or ``.part`` is a ``protected`` file.

    Compared as for :func:`output_file_clash`: relative to the output dir, both spellings, a few
    system calls per protected file and none per job. An object-store output writes no package
    beside the manifest: nothing.
    """
    if settings.out_url is not None:
        return {}
    outs = {settings.out_dir.absolute(), Path(_same_file_key(settings.out_dir))}
    wanted: dict[str, tuple[str, Path, bool]] = {}  # relpath -> (what, file, through the .part)
    for what, path in protected:
        for candidate in {path.absolute(), Path(_same_file_key(path))}:
            for out in outs:
                if candidate.is_relative_to(out):
                    rel = candidate.relative_to(out).as_posix()
                    wanted.setdefault(rel, (what, path, False))
                    if rel.endswith(".part"):
                        wanted.setdefault(rel.removesuffix(".part"), (what, path, True))
    found: dict[int, str] = {}
    for index, spec in enumerate(specs):
        hit = wanted.get(spec.relpath)
        if hit is not None:
            what, path, part = hit
            found[index] = (
                f"export {spec.aoi_id}/{spec.insight_id} ({spec.name}) would write "
                f"{'its .part ' if part else ''}onto {what} {path.absolute()}; change its "
                "name or output.path"
            )
    return found


def key_files(manifest: Manifest, environ: dict[str, str] | None = None) -> list[Path]:
    """The API key files this run reads (``api.key_file``, ``PIXXEL_API_KEY_FILE``), if any."""
    env = os.environ if environ is None else environ
    found = [] if manifest.api.key_file is None else [manifest.api.key_file]
    if env.get(KEY_FILE_ENV):
        found.append(Path(env[KEY_FILE_ENV]))
    return found


def _same_file_key(path: Path) -> str:
    """One spelling per file: absolute, with symlinks of existing folders resolved."""
    path = path.absolute()
    try:
        return str(path.parent.resolve() / path.name)
    except OSError:
        return str(path)


def resolve_api_key(manifest: Manifest, environ: dict[str, str] | None = None) -> str:
    """Return the API key from exactly one source (SPEC §2).

    Sources: the environment variable named by ``api.key_env`` (default ``PIXXEL_API_KEY``), the file
    named by ``api.key_file``, or the file named by ``PIXXEL_API_KEY_FILE`` (surrounding white space
    stripped). Never from the manifest text.

    Raises:
        UsageError: no source, more than one source, or an unreadable/empty key file.
    """
    env = os.environ if environ is None else environ
    key_env = manifest.api.key_env or DEFAULT_KEY_ENV
    sources: list[tuple[str, Callable[[], str]]] = []
    if env.get(key_env):
        sources.append((f"environment variable {key_env}", lambda: env[key_env]))
    if manifest.api.key_file is not None:
        path = manifest.api.key_file
        sources.append((f"key file {path} (api.key_file)", lambda: _read_key_file(path)))
    if env.get(KEY_FILE_ENV):
        env_path = Path(env[KEY_FILE_ENV])
        sources.append((f"key file {env_path} ({KEY_FILE_ENV})", lambda: _read_key_file(env_path)))
    if not sources:
        # Name the variable only if it looks like one: a key pasted into key_env must not echo.
        shown = (
            key_env if re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", key_env) else "named by api.key_env"
        )
        raise UsageError(
            f"no API key: set the environment variable {shown}, or name a key file in "
            f"api.key_file or {KEY_FILE_ENV}"
        )
    if len(sources) > 1:
        names = " and ".join(name for name, _ in sources)
        raise UsageError(f"the API key is set more than once ({names}); keep one")
    key = sources[0][1]().strip()
    if not key:
        raise UsageError(f"the API key from {sources[0][0]} is empty")
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        # An HTTP header value: printable ASCII only (a line break would split the request).
        raise UsageError(
            f"the API key from {sources[0][0]} has characters other than printable ASCII"
        )
    return key


def state_dir_links(state_dir: Path, *, also: tuple[Path, ...] = ()) -> None:
    """Refuse a symlink where the run writes inside its state dir (reports, lock, state store...).

    A run writes ``<state-dir>/reports/``, ``lock``, ``state.sqlite3`` (and SQLite's ``-wal``,
    ``-shm``, ``-journal`` beside it) and, for an object-store output, the default
    ``<state-dir>/staging``; a symbolic link at one of those would send the writes out of the
    state dir. The state dir itself may be a link (the operator chose where it lives).

    Args:
        state_dir: The run's state dir (it may not exist yet).
        also: Further paths the run writes inside it (the default staging folder).

    Raises:
        UsageError: one of them is a symbolic link (named, with where it points).
    """
    for path in (*(state_dir / entry for entry in STATE_ENTRIES), *also):
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise UsageError(
                f"{path} is a symbolic link (to {target}); batch-export writes only inside its "
                "state dir and never through a link: remove the link (or point --state-dir at "
                "the real folder)"
            )


def check_writable(option: str, path: Path) -> None:
    """Fail before any request if ``path`` cannot be written at the end of the run.

    Raises:
        UsageError: the folder cannot be created or written, or ``path`` is a folder.
    """
    folder = path.absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create {folder}: {exc.strerror}") from None
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: {folder} is not writable")


def _read_key_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"cannot read the API key file {path}: {reason}") from None


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"K/N"`` (0-based shard K of N).

    Raises:
        ValueError: not two whole numbers with ``0 <= K < N``.
    """
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError("expected K/N with 0 <= K < N, e.g. 0/4")
    return int(index), int(count)


def select_shard(
    specs: tuple[ExportSpec, ...], shard: tuple[int, int] | None
) -> tuple[ExportSpec, ...]:
    """Return the specs of shard ``K`` of ``N`` (all when ``shard`` is None), manifest order kept."""
    if shard is None:
        return specs
    index, count = shard
    return tuple(spec for spec in specs if shard_of(job_key(spec), count) == index)
