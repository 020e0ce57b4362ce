"""Shared fixtures: the anyio plugin runs on asyncio only (aiohttp is asyncio-only); a real S3."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.s3server import AWS_USER_VARIABLES, S3Proxy, SeaweedS3, s3_environ, seaweed_s3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS) on loopback for the whole session, with bucket ``bucket``."""
    with seaweed_s3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
async def proxy(s3_server: SeaweedS3) -> AsyncIterator[S3Proxy]:
    """A recording (and byte-flipping on demand) proxy in front of :func:`s3_server`.

    ``test_proxy.py`` and ``test_s3_cli.py`` define a ``proxy`` of their own, which wins there.
    """
    recorder = S3Proxy(upstream=s3_server.endpoint)
    await recorder.start()
    yield recorder
    await recorder.close()


@pytest.fixture
def s3_env(proxy: S3Proxy, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 client environment pointed at :func:`proxy`, every other AWS variable unset."""
    for name in AWS_USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = s3_environ(proxy.url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
