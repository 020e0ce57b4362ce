"""Seeded, deterministic catalog of AOIs, insights and asset ids for the sandbox.

The same seed gives the same catalog on every machine and Python version: every choice is drawn from a
:class:`random.Random` seeded with an integer derived from SHA-256, never from ``hash()``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

__all__ = ["Aoi", "Catalog", "Insight"]

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
    """

    id: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Aoi:
    """An area of interest and its insights.

    Attributes:
        id: AOI id, e.g. ``aoi-3f9a1c``.
        name: Human-readable name (informational only).
        insights: The AOI's insights, in catalog order.
    """

    id: str
    name: str
    insights: tuple[Insight, ...]

    def insight(self, insight_id: str) -> Insight | None:
        """Return the insight with this id, or ``None``."""
        for insight in self.insights:
            if insight.id == insight_id:
                return insight
        return None


def _rng(seed: int, *parts: str) -> random.Random:
    text = "\x1f".join(("batch-export-sandbox-catalog", str(seed), *parts))
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


@dataclass(frozen=True, slots=True)
class Catalog:
    """The AOIs, insights and asset ids a sandbox serves, generated from a seed.

    Attributes:
        seed: The seed the catalog was generated from.
        aois: The AOIs, in catalog order (3 to 5 of them, each with 2 to 4 insights).
    """

    seed: int
    aois: tuple[Aoi, ...]

    @classmethod
    def generate(cls, seed: int = 0) -> Catalog:
        """Build the catalog for ``seed``; the same seed always gives the same catalog."""
        rng = _rng(seed)
        used: set[str] = set()

        def fresh(prefix: str) -> str:
            while True:
                candidate = f"{prefix}-{rng.getrandbits(24):06x}"
                if candidate not in used:
                    used.add(candidate)
                    return candidate

        aoi_names = rng.sample(_AOI_NAMES, rng.randint(3, 5))
        aois: list[Aoi] = []
        for aoi_name in aoi_names:
            aoi_id = fresh("aoi")
            insights: list[Insight] = []
            for kind in rng.sample(_INSIGHT_KINDS, rng.randint(2, 4)):
                insight_id = fresh("ins")
                month = rng.randint(1, 10)
                first_day = rng.randint(1, 20)
                step = rng.randint(2, 5)
                inputs = tuple(
                    f"scene_2026_{month:02d}_{first_day + step * i:02d}"
                    for i in range(rng.randint(1, 3))
                )
                outputs = tuple(rng.sample(_OUTPUT_IDS, rng.randint(2, 4)))
                insights.append(Insight(insight_id, kind, inputs, outputs))
            aois.append(Aoi(aoi_id, aoi_name, tuple(insights)))
        return cls(seed=seed, aois=tuple(aois))

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

    def describe(self) -> str:
        """Return a multi-line, human-readable listing of the catalog (for the CLI)."""
        lines: list[str] = []
        for aoi in self.aois:
            lines.append(f"{aoi.id} ({aoi.name})")
            for insight in aoi.insights:
                lines.append(f"  {insight.id} ({insight.kind})")
                lines.append(f"    inputs:  {', '.join(insight.inputs)}")
                lines.append(f"    outputs: {', '.join(insight.outputs)}")
        return "\n".join(lines)
