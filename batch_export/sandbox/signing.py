"""S3-style presigned URLs: HMAC-SHA256 over the raw path and the raw query.

The signature covers the path and query exactly as they appear on the wire (``%2F`` stays ``%2F``),
minus the ``X-Amz-Signature`` parameter itself, so a client that re-quotes the URL it was given is
refused with ``SignatureDoesNotMatch``, as real S3 would.
"""

from __future__ import annotations

import calendar
import enum
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

__all__ = ["SignedUrlCheck", "UrlSigner", "Verdict"]

_SIGNATURE_PARAM = "X-Amz-Signature"


class Verdict(enum.StrEnum):
    """Outcome of checking a presigned URL."""

    OK = "ok"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class SignedUrlCheck:
    """Result of :meth:`UrlSigner.verify`.

    Attributes:
        verdict: Whether the URL may be served.
        expires_at: Expiry moment (seconds since the epoch), when it could be read.
    """

    verdict: Verdict
    expires_at: float | None = None


def _amz_date(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


class UrlSigner:
    """Signs and checks presigned URLs with a per-instance random secret.

    Args:
        secret: HMAC key; a fresh random one when omitted (URLs never survive a restart).
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def _mac(self, raw_path: str, unsigned_query: str) -> str:
        message = f"{raw_path}?{unsigned_query}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, base_url: str, raw_path: str, *, now: float, lifetime: float) -> str:
        """Return a presigned URL for ``raw_path`` on ``base_url``.

        Args:
            base_url: Storage origin, e.g. ``http://127.0.0.1:8766`` (no trailing slash).
            raw_path: Path as it will be sent, already percent-encoded.
            now: Signing moment (seconds since the epoch); becomes ``X-Amz-Date``.
            lifetime: Validity (seconds); becomes the integer ``X-Amz-Expires``.
        """
        stamp = _amz_date(now)
        query = "&".join(
            (
                "X-Amz-Algorithm=AWS4-HMAC-SHA256",
                f"X-Amz-Credential=SANDBOX%2F{stamp[:8]}%2Fus-east-1%2Fs3%2Faws4_request",
                f"X-Amz-Date={stamp}",
                f"X-Amz-Expires={max(0, int(lifetime))}",
                "X-Amz-SignedHeaders=host",
            )
        )
        signature = self._mac(raw_path, query)
        return f"{base_url}{raw_path}?{query}&{_SIGNATURE_PARAM}={signature}"

    def verify(self, raw_path: str, raw_query: str, *, now: float) -> SignedUrlCheck:
        """Check a request's raw path and raw query (as received, not decoded) at ``now``.

        Args:
            raw_path: Path exactly as received, without the query.
            raw_query: Query string exactly as received, without the ``?``.
            now: Current time (seconds since the epoch).
        """
        params = raw_query.split("&") if raw_query else []
        signatures = [p for p in params if p.startswith(f"{_SIGNATURE_PARAM}=")]
        if len(signatures) != 1:
            return SignedUrlCheck(Verdict.BAD_SIGNATURE)
        unsigned = "&".join(p for p in params if not p.startswith(f"{_SIGNATURE_PARAM}="))
        given = signatures[0].partition("=")[2]
        if not hmac.compare_digest(given.encode(), self._mac(raw_path, unsigned).encode()):
            return SignedUrlCheck(Verdict.BAD_SIGNATURE)
        values = dict(p.partition("=")[::2] for p in params)
        try:
            signed_at = calendar.timegm(time.strptime(values["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
            lifetime = int(values["X-Amz-Expires"])
        except (KeyError, ValueError):  # cannot happen for a URL we signed
            return SignedUrlCheck(Verdict.BAD_SIGNATURE)
        expires_at = signed_at + lifetime
        verdict = Verdict.EXPIRED if now > expires_at else Verdict.OK
        return SignedUrlCheck(verdict, expires_at)
