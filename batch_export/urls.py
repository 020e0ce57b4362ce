"""Which URLs the tool may talk to: https everywhere, plain http only on loopback (or when allowed)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from batch_export.redact import redact_url

__all__ = ["is_loopback_host", "url_refusal"]


def is_loopback_host(host: str) -> bool:
    """Return True for ``localhost``, 127.0.0.0/8 and ``::1`` (brackets allowed)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_refusal(url: str, *, allow_http: bool, what: str) -> str | None:
    """Return why ``url`` may not be used (``None`` when it may).

    https is always allowed; http only for loopback hosts or with ``allow_http``; nothing else.
    ``what`` names the URL in the message ("API URL", "signed URL"); queries are redacted.
    """
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in url):
        return f"{what} holds white space or control characters: {redact_url(url)!r}"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return f"{what} is not a valid URL: {redact_url(url)!r}"
    if parts.scheme not in ("https", "http") or not host:
        return f"{what} must be an https:// URL: {redact_url(url)}"
    if parts.scheme == "http" and not (allow_http or is_loopback_host(host)):
        return (
            f"{what} uses plain http on a non-loopback host ({host}); "
            "use https, or pass --allow-http if you really mean it"
        )
    return None
