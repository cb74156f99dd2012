"""Structured JSON logging with request ids.

Owns the log format: one JSON object per line with ``ts``, ``level``, ``logger``, ``msg``, the request
id of the request being served (from a context variable) and any ``extra`` fields. Callers must never
pass tokens or key material; as a second line of defence the formatter redacts values of fields whose
names look secret.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("skr_request_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("token", "secret", "password", "key_hsm", "private", "assertion", "authorization")
_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if rid := request_id_var.get():
            doc["request_id"] = rid
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            doc[key] = "[redacted]" if any(w in key.lower() for w in _SECRET_WORDS) else value
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps(doc, default=str, separators=(",", ":"))


def setup_logging(level: str = "info", log_file: Path | None = None) -> None:
    """Configure the root logger once: JSON lines to stderr, or appended to ``log_file``."""
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))
    # the Azure SDK logs request headers at INFO; keep it quiet unless debugging
    logging.getLogger("azure").setLevel(logging.WARNING if root.level > logging.DEBUG else logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
