"""Seeded, deterministic catalog of AOIs, insights and asset ids for the sandbox.

The same seed gives the same catalog on every machine and Python version: every choice is drawn from a
:class:`random.Random` seeded with an integer derived from SHA-256, never from ``hash()``.

Besides the ids the download PUT needs, every AOI has a project and every insight what the listing
endpoints show (SPEC §7): a name, a listing status (``completed``, ``running``, ``queued``,
``failed``), ``created_at`` and ``deleted_at`` (RFC 3339, UTC), and whether its assets are listed
as DataType objects or, as in older answers, plain strings. Those are drawn from their own random
streams, so the ids of a seed's catalog never change when listing details are added.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime

__all__ = ["LISTING_STATUSES", "Aoi", "Catalog", "Insight", "rfc3339"]

LISTING_STATUSES = ("completed", "running", "queued", "failed")
"""Insight statuses the listing shows (only ``completed`` insights have data to export)."""

_CREATED_FROM = 1790812800.0  # 2026-10-01T00:00:00Z: created_at of seeded insights is in Oct/Nov
_CREATED_SPAN = 61 * 86400
_PROJECTS = 4

_OUTPUT_IDS = (
    "ndvi",
    "cloud_mask",
    "evi",
    "lst",
    "ndwi",
    "savi",
    "chlorophyll",
    "soil_moisture",
    "canopy_height",
    "water_mask",
)
_INSIGHT_KINDS = (
    "crop-health",
    "water-stress",
    "land-cover",
    "urban-heat",
    "forest-change",
    "flood-extent",
)
_AOI_NAMES = (
    "field-12",
    "north-delta",
    "orchard-7",
    "riverbank",
    "plateau-3",
    "coastal-strip",
    "vineyard-2",
    "wetland-east",
)


@dataclass(frozen=True, slots=True)
class Insight:
    """One insight of an AOI and the asset ids that can be selected from it.

    Attributes:
        id: Insight id, e.g. ``ins-7b2e04``.
        kind: Human-readable kind, e.g. ``crop-health`` (informational only).
        inputs: Input asset ids (scenes), e.g. ``scene_2026_05_01``.
        outputs: Output asset ids (derived layers), e.g. ``ndvi``.
        name: Name the listing shows, e.g. ``crop-health-2026-11-14``.
        status: Listing status (one of :data:`LISTING_STATUSES`); the PUT ignores it.
        created_at: Creation time, RFC 3339 UTC (``2026-11-14T22:10:04Z``).
        deleted_at: Deletion time (RFC 3339 UTC), or ``None``; a deleted insight stays listed.
        plain_assets: List ``input``/``output`` as plain strings instead of DataType objects.
    """

    id: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str = ""
    status: str = "completed"
    created_at: str = "2026-10-01T00:00:00Z"
    deleted_at: str | None = None
    plain_assets: bool = False


@dataclass(frozen=True, slots=True)
class Aoi:
    """An area of interest and its insights.

    Attributes:
        id: AOI id, e.g. ``aoi-3f9a1c``.
        name: Human-readable name (informational only).
        insights: The AOI's insights, in catalog order.
        project_id: The project the AOI belongs to, e.g. ``prj-1a2b3c``.
    """

    id: str
    name: str
    insights: tuple[Insight, ...]
    project_id: str = ""

    def insight(self, insight_id: str) -> Insight | None:
        """Return the insight with this id, or ``None``."""
        for insight in self.insights:
            if insight.id == insight_id:
                return insight
        return None


def _rng(seed: int, *parts: str) -> random.Random:
    text = "\x1f".join(("batch-export-sandbox-catalog", str(seed), *parts))
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


def rfc3339(moment: float) -> str:
    """Return ``moment`` (seconds since the epoch) as RFC 3339 UTC, whole seconds: ``…T…Z``."""
    return datetime.fromtimestamp(int(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Ids:
    """Fresh ``prefix-xxxxxx`` ids from one random stream, never repeating one already used."""

    def __init__(self, rng: random.Random, used: set[str]) -> None:
        self._rng = rng
        self.used = used

    def fresh(self, prefix: str) -> str:
        while True:
            candidate = f"{prefix}-{self._rng.getrandbits(24):06x}"
            if candidate not in self.used:
                self.used.add(candidate)
                return candidate


def _assets(rng: random.Random) -> tuple[tuple[str, ...], tuple[str, ...]]:
    month = rng.randint(1, 10)
    first_day = rng.randint(1, 20)
    step = rng.randint(2, 5)
    inputs = tuple(
        f"scene_2026_{month:02d}_{first_day + step * i:02d}" for i in range(rng.randint(1, 3))
    )
    outputs = tuple(rng.sample(_OUTPUT_IDS, rng.randint(2, 4)))
    return inputs, outputs


def _listed(insight: Insight, rng: random.Random) -> Insight:
    """``insight`` with seeded listing details: ~70% completed, ~10% of all deleted."""
    created = _CREATED_FROM + rng.randrange(_CREATED_SPAN)
    created_at = rfc3339(created)
    roll = rng.random()
    status = (
        "completed"
        if roll < 0.7
        else "running"
        if roll < 0.8
        else "queued"
        if roll < 0.9
        else "failed"
    )
    deleted_at = rfc3339(created + 86400 + rng.randrange(86400)) if rng.random() < 0.1 else None
    return replace(
        insight,
        name=f"{insight.kind}-{created_at[:10]}",
        status=status,
        created_at=created_at,
        deleted_at=deleted_at,
        plain_assets=rng.random() < 0.2,
    )


@dataclass(frozen=True, slots=True)
class Catalog:
    """The AOIs, insights and asset ids a sandbox serves, generated from a seed.

    Attributes:
        seed: The seed the catalog was generated from.
        aois: The AOIs, in catalog order (3 to 5 of them, each with 2 to 4 insights, unless
            :meth:`generate` was asked for more).
    """

    seed: int
    aois: tuple[Aoi, ...]

    @classmethod
    def generate(cls, seed: int = 0, aoi_count: int | None = None) -> Catalog:
        """Build the catalog for ``seed``; the same arguments always give the same catalog.

        Args:
            seed: Seeds every choice.
            aoi_count: At least this many AOIs: the seeded 3 to 5 come first (unchanged), then
                more AOIs with 1 to 3 insights each, from their own random stream; ``None``: the
                seeded ones only.
        """
        rng = _rng(seed)
        ids = _Ids(rng, set())
        aoi_names = rng.sample(_AOI_NAMES, rng.randint(3, 5))
        drafts: list[tuple[str, str, list[Insight]]] = []
        for aoi_name in aoi_names:
            aoi_id = ids.fresh("aoi")
            insights: list[Insight] = []
            for kind in rng.sample(_INSIGHT_KINDS, rng.randint(2, 4)):
                insight_id = ids.fresh("ins")
                inputs, outputs = _assets(rng)
                insights.append(Insight(insight_id, kind, inputs, outputs))
            drafts.append((aoi_id, aoi_name, insights))
        extra = _rng(seed, "extra-aois")
        extra_ids = _Ids(extra, ids.used)
        for number in range(len(drafts), aoi_count or 0):
            aoi_id = extra_ids.fresh("aoi")
            insights = []
            for kind in extra.sample(_INSIGHT_KINDS, extra.randint(1, 3)):
                inputs, outputs = _assets(extra)
                insights.append(Insight(extra_ids.fresh("ins"), kind, inputs, outputs))
            drafts.append((aoi_id, f"{extra.choice(_AOI_NAMES)}-{number}", insights))
        listing = _rng(seed, "listing")
        projects = [_Ids(listing, ids.used).fresh("prj") for _ in range(_PROJECTS)]
        aois = tuple(
            Aoi(
                aoi_id,
                aoi_name,
                tuple(_listed(insight, listing) for insight in insights),
                project_id=projects[index % _PROJECTS],
            )
            for index, (aoi_id, aoi_name, insights) in enumerate(drafts)
        )
        return cls(seed=seed, aois=aois)

    @property
    def project_ids(self) -> tuple[str, ...]:
        """The projects of the AOIs, in order of first appearance."""
        return tuple(dict.fromkeys(aoi.project_id for aoi in self.aois))

    def aoi(self, aoi_id: str) -> Aoi | None:
        """Return the AOI with this id, or ``None``."""
        for aoi in self.aois:
            if aoi.id == aoi_id:
                return aoi
        return None

    def insight(self, aoi_id: str, insight_id: str) -> Insight | None:
        """Return the insight ``insight_id`` of AOI ``aoi_id``, or ``None`` if either is unknown."""
        aoi = self.aoi(aoi_id)
        return None if aoi is None else aoi.insight(insight_id)

    def with_insight(self, aoi_id: str, insight: Insight) -> Catalog:
        """Return this catalog with ``insight`` added to AOI ``aoi_id`` (or replacing its namesake).

        An insight with the same id is replaced in place, so a status change is a ``with_insight``.

        Raises:
            KeyError: no AOI ``aoi_id``.
        """
        if self.aoi(aoi_id) is None:
            raise KeyError(aoi_id)
        aois = []
        for aoi in self.aois:
            if aoi.id == aoi_id:
                kept = [i for i in aoi.insights if i.id != insight.id]
                if len(kept) == len(aoi.insights):
                    kept.append(insight)
                else:
                    kept = [insight if i.id == insight.id else i for i in aoi.insights]
                aoi = replace(aoi, insights=tuple(kept))
            aois.append(aoi)
        return replace(self, aois=tuple(aois))

    def new_insight(
        self,
        aoi_id: str,
        number: int,
        *,
        now: float,
        status: str = "completed",
        name: str | None = None,
    ) -> Insight:
        """Draw the ``number``-th added insight of AOI ``aoi_id`` (deterministic; not added).

        Args:
            aoi_id: The AOI it will belong to.
            number: Counts insights added to this catalog so far (makes the draw unique).
            now: Its ``created_at`` (seconds since the epoch).
            status: Its listing status.
            name: Its name; default ``<kind>-<created date>``.
        """
        rng = _rng(self.seed, "added", aoi_id, str(number))
        used = {i.id for aoi in self.aois for i in aoi.insights}
        insight_id = _Ids(rng, used).fresh("ins")
        kind = rng.choice(_INSIGHT_KINDS)
        inputs, outputs = _assets(rng)
        created_at = rfc3339(now)
        return Insight(
            insight_id,
            kind,
            inputs,
            outputs,
            name=name if name is not None else f"{kind}-{created_at[:10]}",
            status=status,
            created_at=created_at,
        )

    def describe(self) -> str:
        """Return a multi-line, human-readable listing of the catalog (for the CLI)."""
        lines: list[str] = []
        for aoi in self.aois:
            lines.append(f"{aoi.id} ({aoi.name}, project {aoi.project_id})")
            for insight in aoi.insights:
                deleted = f", deleted {insight.deleted_at}" if insight.deleted_at else ""
                lines.append(
                    f"  {insight.id} ({insight.kind}) {insight.name}: {insight.status}{deleted}"
                )
                lines.append(f"    inputs:  {', '.join(insight.inputs)}")
                lines.append(f"    outputs: {', '.join(insight.outputs)}")
        return "\n".join(lines)
