import logging

import pytest

from batch_export.redact import RedactingFilter, Redactor, redact_url
from batch_export.units import parse_duration
from batch_export.urls import is_loopback_host, url_refusal


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2", 2.0),
        ("0.5", 0.5),
        ("500ms", 0.5),
        ("90s", 90.0),
        ("1.5s", 1.5),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        (3, 3.0),
        (0.25, 0.25),
        ("1h0m5s", 3605.0),
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "abc", "-1", "1m1h", "1hh", "5 s", "1.5.5s", "nan", "inf", True]
)
def test_bad_durations(text: str | bool) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_redact_url_and_text() -> None:
    url = "https://bucket.s3.amazonaws.com/p.zip?X-Amz-Signature=abc&X-Amz-Credential=K%2F1"
    assert redact_url(url) == "https://bucket.s3.amazonaws.com/p.zip?<redacted>"
    r = Redactor(["sekret-key"])
    text = f"GET {url} failed; Authorization: sekret-key"
    out = r(text)
    assert "abc" not in out and "sekret-key" not in out
    assert (
        out
        == "GET https://bucket.s3.amazonaws.com/p.zip?<redacted> failed; Authorization: <redacted>"
    )


def test_redacting_filter_covers_args_and_tracebacks() -> None:
    r = Redactor(["k3y"])
    record = logging.LogRecord("x", logging.ERROR, "f", 1, "oops %s", ("k3y",), None)
    try:
        raise ValueError("http://h/x?sig=zzz k3y")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    RedactingFilter(r).filter(record)
    rendered = logging.Formatter().format(record)
    assert "k3y" not in rendered and "zzz" not in rendered


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]"])
def test_loopback(host: str) -> None:
    assert is_loopback_host(host)


def test_url_policy() -> None:
    assert url_refusal("https://api.pixxel.space", allow_http=False, what="API URL") is None
    assert url_refusal("http://127.0.0.1:8765", allow_http=False, what="API URL") is None
    assert url_refusal("http://[::1]:1/x", allow_http=False, what="API URL") is None
    refusal = url_refusal("http://example.com/x?sig=1", allow_http=False, what="signed URL")
    assert refusal is not None and "--allow-http" in refusal
    assert url_refusal("http://example.com/x", allow_http=True, what="API URL") is None
    assert url_refusal("ftp://example.com/x", allow_http=True, what="API URL") is not None
    assert url_refusal("file:///etc/passwd", allow_http=True, what="signed URL") is not None


def test_log_lines_escape_control_characters() -> None:
    record = logging.LogRecord(
        "x", logging.WARNING, "f", 1, "server said %s", ("a\x1b]0;pwned\x07\nFAKE LINE",), None
    )
    RedactingFilter(Redactor()).filter(record)
    assert record.getMessage() == "server said a\\x1b]0;pwned\\x07\\x0aFAKE LINE"


def test_short_keys_are_redacted_as_tokens_and_reports_keep_their_shape() -> None:
    r = Redactor(["1"])
    assert r(
        "run 20261129T030000Z-1a2b: 1 job, key 1"
    ) == "run 20261129T030000Z-1a2b: 1 job, key 1".replace(" 1 ", " <redacted> ").replace(
        "key 1", "key <redacted>"
    )
    doc = {"run_id": "20261129T030000Z-ab", "counts": {"total": 1}, "msg": "Authorization: 1"}
    assert r.redact_values(doc) == {
        "run_id": "20261129T030000Z-ab",
        "counts": {"total": 1},
        "msg": "Authorization: <redacted>",
    }


def test_redacted_query_is_not_redacted_twice() -> None:
    r = Redactor()
    once = r("GET http://h/p.zip?sig=1")
    assert once == "GET http://h/p.zip?<redacted>"
    assert r(once) == once


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "proxy http://bob:hunter2@proxy.corp:3128 refused",
            "proxy http://<redacted>@proxy.corp:3128 refused",
        ),
        ("s3://AKIA:secret@bucket/key", "s3://<redacted>@bucket/key"),
        (
            "no such key /bucket/p.zip?X-Amz-Signature=dead&X-Amz-Date=1",
            "no such key /bucket/p.zip?<redacted>",
        ),
        ("p.zip?X-Amz-Signature=dead&Expires=1", "p.zip?<redacted>"),
        ("bad &sig=abcdEF12 here", "bad &sig=<redacted> here"),
        ("X-Amz-Credential=AKIA/2026/us-east-1/s3", "X-Amz-Credential=<redacted>"),
        ("X-Goog-Signature=0a1b2c", "X-Goog-Signature=<redacted>"),
        ("token=abc, tokens=3", "token=<redacted>, tokens=3"),
        (
            "<Code>SignatureDoesNotMatch</Code><SignatureProvided>abc</SignatureProvided>"
            "<StringToSign>AWS4 x</StringToSign>",
            "<Code>SignatureDoesNotMatch</Code><SignatureProvided><redacted></SignatureProvided>"
            "<StringToSign><redacted></StringToSign>",
        ),
        ("echo: Authorization: Basic dXNlcjpwYXNz, next", "echo: Authorization: <redacted>, next"),
        ('{"Proxy-Authorization": "Bearer abc"}', '{"Proxy-Authorization": "<redacted>"}'),
        ("is it ready? yes", "is it ready? yes"),
        ("mail bob@example.com", "mail bob@example.com"),
        ("see http://h/x?<redacted>", "see http://h/x?<redacted>"),
    ],
)
def test_server_text_kinds_are_redacted(text: str, expected: str) -> None:
    redactor = Redactor()
    assert redactor(text) == expected
    assert redactor(redactor(text)) == expected  # idempotent: a second pass changes nothing
