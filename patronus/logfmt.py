"""Log lines for people or for machines: ``text`` (the default) or ``json``
(one JSON object a line, for Loki, Elasticsearch, journald's JSON mode...).

Every JSON line has ``ts`` (ISO 8601, UTC, ms), ``level``, ``logger`` and
``msg``; and, where the line is about one, the same fields everywhere:
``site``, ``path``, ``policy``, ``remote_site``, ``reason`` (passed with
``extra={...}``; the agent's site is added to every line of the agent).

>>> import io, json, logging
>>> out = io.StringIO()
>>> log = configure("json", stream=out, site="hq", logger=logging.getLogger("doc"))
>>> logging.getLogger("doc").info("move %s", "voip", extra={"policy": "voip", "reason": "bfd_down"})
>>> line = json.loads(out.getvalue())
>>> line["msg"], line["site"], line["policy"], line["reason"]
('move voip', 'hq', 'voip', 'bfd_down')
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from .errors import ConfigError

__all__ = ["JsonFormatter", "configure", "FIELDS", "FORMATS"]

FIELDS = ("site", "path", "policy", "remote_site", "reason")
FORMATS = ("text", "json")
TEXT = "%(asctime)s.%(msecs)03d %(levelname).1s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line with the fields of ``FIELDS`` where a record has them."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Site(logging.Filter):
    def __init__(self, site: str) -> None:
        super().__init__()
        self.site = site

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "site", None) is None:
            record.site = self.site
        return True


def configure(fmt: str = "text", *, level: int = logging.INFO, stream: IO[str] | None = None,
              site: str | None = None, logger: logging.Logger | None = None) -> logging.Logger:
    """Send ``logger``'s lines (default: the root logger's) to ``stream``
    (stderr) as ``fmt``; ``site`` goes into every JSON line."""
    if fmt not in FORMATS:
        raise ConfigError("log format", fmt, f"is not one of {', '.join(FORMATS)}")
    target = logger if logger is not None else logging.getLogger()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT, datefmt="%H:%M:%S"))
    if site is not None:
        handler.addFilter(_Site(site))
    target.addHandler(handler)
    target.setLevel(level)
    return target
