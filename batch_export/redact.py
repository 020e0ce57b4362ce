"""Redaction of secrets from anything a human or a file will see.

Signed-URL query strings carry the credential of the storage host; the API key is the user's;
a proxy URL may carry a user and password. None may reach a log line, a report, the state store,
an exception message or a traceback. Everything a server says (error codes, messages, bodies)
passes through :class:`Redactor` where it enters (the API client, the downloader), and everything
that formats text for output passes through it again.

What a :class:`Redactor` removes, besides the secrets it is given:

- the query string of any ``scheme://host/path?query`` URL, and of a bare ``path/or.file?name=value``
  (a signed URL echoed without its ``scheme://host``);
- URL userinfo: ``scheme://user:password@host`` -> ``scheme://<redacted>@host``;
- well-known signing and credential parameters wherever they stand (``X-Amz-Signature=``,
  ``X-Amz-Credential=``, ``X-Amz-Security-Token=``, ``X-Goog-Signature=``, ``X-Goog-Credential=``,
  ``Signature=``, ``sig=``, ``AWSAccessKeyId=``, ``Key-Pair-Id=``, ``token=``, ``access_token=``,
  ``api_key=``; AWS S3, Google Cloud Storage, Azure SAS and CloudFront presigned URL vocabulary);
- what S3 echoes of a signature in its ``SignatureDoesNotMatch`` body (``<SignatureProvided>``,
  ``<StringToSign>``, ``<StringToSignBytes>``, ``<CanonicalRequest>``, ``<CanonicalRequestBytes>``,
  ``<AWSAccessKeyId>``);
- the value of echoed ``Authorization``, ``Proxy-Authorization`` and ``X-Api-Key`` headers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = [
    "REDACTED",
    "RedactingFilter",
    "Redactor",
    "escape_controls",
    "redact_patterns",
    "redact_url",
]

REDACTED = "<redacted>"
# A URL followed by a query string: keep scheme://host/path, drop the query (and fragment).
# "+" not "*": an already redacted "?<redacted>" does not match again.
_URL_QUERY = re.compile(r"(?i)\b((?:https?|wss?)://[^\s?#\"'<>]*)\?[^\s\"'<>]+")
# A path followed by "?name=value": a signed URL's query without its scheme://host in front.
_BARE_QUERY = re.compile(r"([\w~%-]*[./][\w.~%/-]*)\?[\w.~%-]+=[^\s\"'<>]*")
# scheme://user[:password]@host -> scheme://<redacted>@host (proxy URLs, storage URLs).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#@\"'<>]+@")
_SIGNING_PARAMS = re.compile(
    r"(?i)(?<![\w-])(x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature"
    r"|x-goog-credential|signature|sig|awsaccesskeyid|key-pair-id|token|access_token|api_?key)"
    r"=(?!<redacted>)[^\s&,;\"'<>]+"
)
_S3_ECHOES = re.compile(
    r"<(SignatureProvided|StringToSign|StringToSignBytes|CanonicalRequest|CanonicalRequestBytes"
    r"|AWSAccessKeyId)>[^<]*</\1>"
)
_AUTH_HEADERS = re.compile(
    r"(?i)\b(authorization|proxy-authorization|x-api-key)([\"']?\s*[:=]\s*[\"']?)"
    r"(?!<redacted>)(?:(?:basic|bearer|digest|token)\s+)?[^\s\"',;<>]+"
)
#: Secrets shorter than this are redacted only as whole tokens, so that a (silly) key like "1" does
#: not turn every digit of a report into "<redacted>".
_SHORT_SECRET = 8


def redact_url(url: str) -> str:
    """Return ``url`` with its query string replaced by ``?<redacted>`` (no change if it has none)."""
    base, sep, _ = url.partition("?")
    return f"{base}?{REDACTED}" if sep else base


def redact_patterns(text: str) -> str:
    """Return ``text`` without the secrets any text may hold (see the module docstring).

    Needs no list of secrets: URL queries, userinfo, signing parameters, S3 signature echoes and
    echoed authorization headers.
    """
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _URL_QUERY.sub(lambda m: f"{m.group(1)}?{REDACTED}", text)
    text = _BARE_QUERY.sub(lambda m: f"{m.group(1)}?{REDACTED}", text)
    text = _SIGNING_PARAMS.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _S3_ECHOES.sub(lambda m: f"<{m.group(1)}>{REDACTED}</{m.group(1)}>", text)
    return _AUTH_HEADERS.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


class Redactor:
    """Removes the given secrets and every URL query string from text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self._short: list[re.Pattern[str]] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Also redact ``secret`` from now on (ignored when empty)."""
        if not secret or secret in self._secrets:
            return
        self._secrets.append(secret)
        self._secrets.sort(key=len, reverse=True)
        if len(secret) < _SHORT_SECRET:
            token = re.escape(secret)
            self._short.append(re.compile(rf"(?<![A-Za-z0-9_]){token}(?![A-Za-z0-9_])"))

    def __call__(self, text: str) -> str:
        """Return ``text`` without secrets, URL query strings, userinfo or signing parameters."""
        for secret in self._secrets:
            if len(secret) >= _SHORT_SECRET:
                text = text.replace(secret, REDACTED)
        for pattern in self._short:
            text = pattern.sub(REDACTED, text)
        return redact_patterns(text)

    def redact_values(self, value: object) -> object:
        """Return ``value`` (JSON-like: dicts, lists, strings, numbers) with every string redacted.

        Numbers and keys are left alone, so the document keeps its shape and types.
        """
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {key: self.redact_values(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_values(item) for item in value]
        return value


_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # all but tab: no forged lines


def escape_controls(text: str) -> str:
    """Show control characters as ``\\xNN``: a server's text must not drive the terminal."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the rendered message (args included) and exception text."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the record's message once, redacted; format any traceback redacted too."""
        record.msg = escape_controls(self._redact(record.getMessage()))
        record.args = None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self._redact(text)
            record.exc_info = None
        return True
