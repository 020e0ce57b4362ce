"""Shared fixtures: the anyio plugin runs on asyncio only (aiohttp is asyncio-only); a real S3."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3server import SeaweedS3, seaweed_s3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS) on loopback for the whole session, with bucket ``bucket``."""
    with seaweed_s3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server
