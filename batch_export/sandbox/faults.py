"""Fault injection: fixed hook points where the sandbox departs from the happy path.

The server asks :class:`Faults` at each hook point; :class:`Faults` asks its hooks in order. Every hook
derives from :class:`FaultHook`, whose methods are no-ops, so a new kind of fault overrides only the
points it cares about and is added with ``sandbox.faults.add(hook)``. :class:`ConfigFaults` implements
the faults set in :class:`~batch_export.sandbox.config.SandboxConfig` and is always installed first.

Hook points:

* API, after the key and the rate limit passed: :meth:`FaultHook.api_response` may answer instead
  (5xx, 429, HTML page …).
* API, permission: :meth:`FaultHook.denies`; package outcome: :meth:`FaultHook.fails`; signed URL
  lifetime: :meth:`FaultHook.url_lifetime` (``config.url_lifetime`` is the starting value).
* Package content: :meth:`FaultHook.corrupts`.
* Storage, after the signature was accepted: :meth:`FaultHook.storage_response` may answer instead;
  :meth:`FaultHook.storage_plan` adjusts how the body is sent (:class:`StoragePlan`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from batch_export.sandbox.config import SandboxConfig
from batch_export.sandbox.packages import Selection

__all__ = ["ApiContext", "ConfigFaults", "FaultHook", "Faults", "StorageContext", "StoragePlan"]


@dataclass(frozen=True, slots=True)
class ApiContext:
    """A PUT that passed the key check and the rate limit.

    Attributes:
        request: The request (its body is already read: ``await request.read()`` is cheap).
        key: The API key it carried.
        aoi_id: AOI id from the path.
        insight_id: Insight id from the path.
        number: 1-based count of API requests that reached this hook point.
    """

    request: web.Request
    key: str
    aoi_id: str
    insight_id: str
    number: int


@dataclass(frozen=True, slots=True)
class StorageContext:
    """A storage GET whose signature was accepted.

    Attributes:
        request: The request.
        package_id: Package id from the path.
        selection: What the package contains.
        attempt: 1-based count of accepted GETs of this package, this one included.
    """

    request: web.Request
    package_id: str
    selection: Selection
    attempt: int


@dataclass(slots=True)
class StoragePlan:
    """How one storage GET sends its body; hooks adjust it in place.

    Attributes:
        cut_after_bytes: Send the headers (full ``Content-Length``), this many body bytes, then
            close the connection; ``None`` sends the whole body.
    """

    cut_after_bytes: int | None = None


class FaultHook:
    """Base class of fault hooks; every method is a no-op, override the points you need."""

    def api_response(self, ctx: ApiContext) -> web.StreamResponse | None:
        """Return a response to send instead of handling the PUT, or ``None``."""
        return None

    def denies(self, key: str, aoi_id: str, insight_id: str) -> bool:
        """Return ``True`` to answer 403 (permission) for this AOI/insight."""
        return False

    def fails(self, selection: Selection) -> bool:
        """Return ``True`` to end this package in the failed status instead of ready."""
        return False

    def corrupts(self, selection: Selection) -> bool:
        """Return ``True`` to serve this package with one flipped byte inside a member's data."""
        return False

    def url_lifetime(self, selection: Selection, lifetime: float) -> float:
        """Return the lifetime (seconds) of the signed URL about to be issued for ``selection``."""
        return lifetime

    def storage_response(self, ctx: StorageContext) -> web.StreamResponse | None:
        """Return a response to send instead of the package, or ``None``."""
        return None

    def storage_plan(self, ctx: StorageContext, plan: StoragePlan) -> None:
        """Adjust ``plan`` for this GET."""


class ConfigFaults(FaultHook):
    """The faults configured in :class:`SandboxConfig`, read afresh at every request.

    Args:
        config: Returns the sandbox's current configuration.
    """

    def __init__(self, config: Callable[[], SandboxConfig]) -> None:
        self._config = config

    def denies(self, key: str, aoi_id: str, insight_id: str) -> bool:
        """Deny the AOIs in ``denied_aois``."""
        return aoi_id in self._config().denied_aois

    def fails(self, selection: Selection) -> bool:
        """Fail the insights in ``fail_insights``."""
        return selection.insight_id in self._config().fail_insights

    def corrupts(self, selection: Selection) -> bool:
        """Corrupt the insights in ``corrupt_insights``."""
        return selection.insight_id in self._config().corrupt_insights

    def storage_plan(self, ctx: StorageContext, plan: StoragePlan) -> None:
        """Cut the first ``cut_times`` GETs of each package after ``cut_after_bytes``."""
        config = self._config()
        if config.cut_after_bytes is not None and ctx.attempt <= config.cut_times:
            plan.cut_after_bytes = config.cut_after_bytes


class Faults:
    """The hooks in force, asked in order at each hook point.

    Args:
        hooks: Initial hooks, asked in this order.
    """

    def __init__(self, hooks: list[FaultHook] | None = None) -> None:
        self.hooks: list[FaultHook] = list(hooks or [])

    def add(self, hook: FaultHook) -> None:
        """Install ``hook`` after the existing ones."""
        self.hooks.append(hook)

    def remove(self, hook: FaultHook) -> None:
        """Uninstall ``hook``."""
        self.hooks.remove(hook)

    def api_response(self, ctx: ApiContext) -> web.StreamResponse | None:
        """First non-``None`` answer of the hooks."""
        for hook in self.hooks:
            response = hook.api_response(ctx)
            if response is not None:
                return response
        return None

    def denies(self, key: str, aoi_id: str, insight_id: str) -> bool:
        """Whether any hook denies this AOI/insight."""
        return any(hook.denies(key, aoi_id, insight_id) for hook in self.hooks)

    def fails(self, selection: Selection) -> bool:
        """Whether any hook fails this package."""
        return any(hook.fails(selection) for hook in self.hooks)

    def corrupts(self, selection: Selection) -> bool:
        """Whether any hook corrupts this package."""
        return any(hook.corrupts(selection) for hook in self.hooks)

    def url_lifetime(self, selection: Selection, lifetime: float) -> float:
        """``lifetime`` (seconds, from the config) as adjusted by each hook in turn."""
        for hook in self.hooks:
            lifetime = hook.url_lifetime(selection, lifetime)
        return lifetime

    def storage_response(self, ctx: StorageContext) -> web.StreamResponse | None:
        """First non-``None`` answer of the hooks."""
        for hook in self.hooks:
            response = hook.storage_response(ctx)
            if response is not None:
                return response
        return None

    def storage_plan(self, ctx: StorageContext) -> StoragePlan:
        """The plan for this GET after every hook adjusted it."""
        plan = StoragePlan()
        for hook in self.hooks:
            hook.storage_plan(ctx, plan)
        return plan
