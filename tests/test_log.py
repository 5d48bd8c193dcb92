"""Tests for onionp2p.log."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Iterator

import pytest

from onionp2p.errors import ConfigError
from onionp2p.log import (
    SCRUBBED,
    Sensitive,
    configure_logging,
    get_logger,
    is_safe_logging,
    reset_logging,
    safe,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    reset_logging()
    root.setLevel(level)
    logging.captureWarnings(False)


def json_lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_output_is_parseable_and_has_standard_fields() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    get_logger("onionp2p.test").info("hello", n=3)
    (rec,) = json_lines(buf)
    assert rec["event"] == "hello"
    assert rec["n"] == 3
    assert rec["level"] == "info"
    assert rec["logger"] == "onionp2p.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", rec["timestamp"])


def test_safe_logging_scrubs_sensitive_keys() -> None:
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    get_logger("t").info("connect", address="1.2.3.4", target="example.com:80", peer_addr="5.6.7.8",
                         socks_user="alice", circ_id=7)
    (rec,) = json_lines(buf)
    assert rec["address"] == rec["target"] == rec["peer_addr"] == rec["socks_user"] == SCRUBBED
    assert rec["circ_id"] == 7
    assert "1.2.3.4" not in buf.getvalue() and "example.com" not in buf.getvalue()


def test_safe_wrapper_scrubs_regardless_of_key() -> None:
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    get_logger("t").info("resolved", answer_count=1, thing=safe("secret.example"))
    (rec,) = json_lines(buf)
    assert rec["thing"] == SCRUBBED
    assert "secret.example" not in buf.getvalue()
    assert str(safe("x")) == SCRUBBED and f"{safe('x')}" == SCRUBBED and repr(safe(1)) == SCRUBBED


def test_safe_logging_off_shows_values() -> None:
    buf = io.StringIO()
    configure_logging("debug", "json", safe_logging=False, stream=buf)
    assert not is_safe_logging()
    get_logger("t").info("connect", address="1.2.3.4", thing=safe("secret.example"))
    (rec,) = json_lines(buf)
    assert rec["address"] == "1.2.3.4"
    assert rec["thing"] == "secret.example"
    assert str(safe("x")) == "x" and f"{safe(5):03d}" == "005"


def test_console_scrubbing_and_no_colours_on_non_tty() -> None:
    buf = io.StringIO()
    configure_logging("info", "console", stream=buf)
    get_logger("onionp2p.relay").warning("refused", client="9.9.9.9", reason="exitpolicy")
    out = buf.getvalue()
    assert "refused" in out and "onionp2p.relay" in out and "warning" in out
    assert "client=[scrubbed]" in out and "reason=exitpolicy" in out
    assert "9.9.9.9" not in out
    assert "\x1b[" not in out


def test_context_binding_appears_in_output() -> None:
    buf = io.StringIO()
    log = get_logger("onionp2p.circuit", chan_id=4)
    configure_logging("debug", "json", stream=buf)  # configured after the logger was made
    circ_log = log.bind(circ_id=0x80000001)
    circ_log.bind(stream_id=9).debug("stream opened")
    circ_log.info("circuit built")
    first, second = json_lines(buf)
    assert first["chan_id"] == 4 and first["circ_id"] == 0x80000001 and first["stream_id"] == 9
    assert second["circ_id"] == 0x80000001 and "stream_id" not in second


def test_console_context_binding() -> None:
    buf = io.StringIO()
    configure_logging("info", "console", stream=buf)
    get_logger("x").bind(circ_id=1234).info("extended")
    assert "circ_id=1234" in buf.getvalue()


def test_level_filtering() -> None:
    buf = io.StringIO()
    configure_logging("warning", "json", stream=buf)
    log = get_logger("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [r["event"] for r in json_lines(buf)] == ["w", "e"]
    assert [r["level"] for r in json_lines(buf)] == ["warning", "error"]


def test_reconfiguration_replaces_output() -> None:
    first, second = io.StringIO(), io.StringIO()
    log = get_logger("t").bind(circ_id=1)
    configure_logging("info", "json", stream=first)
    log.info("one")
    configure_logging("info", "console", stream=second)
    log.info("two")
    assert [r["event"] for r in json_lines(first)] == ["one"]
    assert "two" in second.getvalue() and "one" not in second.getvalue()


def test_stdlib_logging_goes_through_same_output_and_scrubbing() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    logging.getLogger("asyncio").warning("conn to %s lost", safe("1.2.3.4"), extra={"peer": "5.6.7.8"})
    logging.getLogger("asyncio").debug("filtered out")
    (rec,) = json_lines(buf)
    assert rec["logger"] == "asyncio"
    assert rec["level"] == "warning"
    assert rec["event"] == f"conn to {SCRUBBED} lost"
    assert rec["peer"] == SCRUBBED


def test_python_warnings_are_captured() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    assert any("careful" in r["event"] for r in json_lines(buf))


def test_exceptions_rendered_without_locals() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    secret_local = "10.20.30.40"  # noqa: F841 - must not leak through frame locals
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("t").exception("failed")
    (rec,) = json_lines(buf)
    assert "RuntimeError: boom" in rec["exception"]
    assert "10.20.30.40" not in buf.getvalue()


def test_none_values_are_not_scrubbed() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    get_logger("t").info("x", address=None)
    assert json_lines(buf)[0]["address"] is None


def test_safe_is_idempotent_and_comparable() -> None:
    s = safe("a")
    assert safe(s) is s
    assert s == Sensitive("a") and hash(s) == hash(Sensitive("a"))


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "json"), ("info", "xml"), (3, "json")])
def test_bad_arguments(level, fmt) -> None:
    with pytest.raises(ConfigError):
        configure_logging(level, fmt, stream=io.StringIO())


def test_reset_logging_stops_output() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", safe_logging=False, stream=buf)
    reset_logging()
    assert is_safe_logging()
    logging.getLogger("after").error("nothing here")
    assert buf.getvalue() == ""
