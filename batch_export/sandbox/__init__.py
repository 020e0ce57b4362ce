"""The simulated Pixxel insights API (SPEC §6): an API origin and a storage origin on loopback.

A separate server that happens to ship in the package: it imports nothing from the client side of
``batch_export`` (stdlib, aiohttp, click and PyYAML only). Typical use in a test::

    async with Sandbox(SandboxConfig(asset_size=1024)) as sandbox:
        ...  # PUT to f"{sandbox.api_url}/v0/aoi/{aoi}/insights/{insight}/download"
        assert sandbox.requests_to("storage", "GET")[0].header("Authorization") is None

Faults by rule (see :mod:`batch_export.sandbox.script`)::

    sandbox.faults.add(FaultScript([Rule(Fault.HTTP_ERROR, "api", status=503, nth=(1,))]))
"""

from batch_export.sandbox.catalog import Aoi, Catalog, Insight
from batch_export.sandbox.config import DEMO_KEY, VOCABULARIES, RecordedRequest, SandboxConfig
from batch_export.sandbox.faults import (
    ApiContext,
    ConfigFaults,
    Ending,
    FaultHook,
    Faults,
    ListingContext,
    ListingPlan,
    ScriptedResponse,
    SegmentFault,
    StorageContext,
    StoragePlan,
)
from batch_export.sandbox.listing import ListingRoutes
from batch_export.sandbox.packages import Selection
from batch_export.sandbox.script import Fault, FaultScript, Firing, Rule
from batch_export.sandbox.server import Sandbox

__all__ = [
    "DEMO_KEY",
    "VOCABULARIES",
    "Aoi",
    "ApiContext",
    "Catalog",
    "ConfigFaults",
    "Ending",
    "Fault",
    "FaultHook",
    "FaultScript",
    "Faults",
    "Firing",
    "Insight",
    "ListingContext",
    "ListingPlan",
    "ListingRoutes",
    "RecordedRequest",
    "Rule",
    "Sandbox",
    "SandboxConfig",
    "ScriptedResponse",
    "SegmentFault",
    "Selection",
    "StorageContext",
    "StoragePlan",
]
