"""Log lines as JSON (--log-format json): the formatter's fields, and the
controller's own lines (uvicorn's included) as JSON in a real run."""

from __future__ import annotations

import io
import json
import logging

import pytest

from patronus.errors import ConfigError
from patronus.logfmt import configure

from .controller_server import Controller


def test_fields_are_the_same_everywhere_and_only_where_given():
    out = io.StringIO()
    log = logging.getLogger("test.logfmt")
    log.propagate = False
    configure("json", stream=out, site="br1", logger=log)
    log.info("bfd %s up", "p1", extra={"path": "p1", "reason": "bfd_up"})
    log.warning("plain")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, plain, failed = (json.loads(x) for x in out.getvalue().splitlines())
    assert first["msg"] == "bfd p1 up" and first["path"] == "p1" and first["reason"] == "bfd_up"
    assert first["site"] == plain["site"] == "br1" and first["level"] == "info" and first["ts"].endswith("Z")
    assert "policy" not in plain and "path" not in plain and plain["level"] == "warning"
    assert "ValueError: boom" in failed["exc"]


def test_an_unknown_format_is_refused():
    with pytest.raises(ConfigError, match="log format"):
        configure("xml")


def test_the_controller_logs_json_lines(tmp_path):
    ctl = Controller(tmp_path / "ctl", args=["--log-format", "json", "--log-level", "info"]).start()
    try:
        with ctl.client() as c:
            assert c.get("/healthz").status_code == 200
    finally:
        ctl.stop()
    lines = [x for x in ctl.log.read_text().splitlines() if x.strip()]
    parsed = [json.loads(x) for x in lines]   # every line: a JSON object
    assert any(p["logger"].startswith("uvicorn") and "startup" in p["msg"].lower() for p in parsed), parsed[:5]
