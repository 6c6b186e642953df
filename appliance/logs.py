"""Logging to stdout for journald: one JSON object per line (or plain text on request).

Callers pass structured fields as ``log.info("delivery", extra={"fields": {...}})``. Nothing in
this module ever sees a secret or a body: callers pass ids, counts and outcomes only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from . import jsoncodec

_STD = set(vars(logging.makeLogRecord({})))


class JSONFormatter(logging.Formatter):
    """One JSON object per line. The request path writes one line per delivery, so the
    formatter encodes with orjson (jsoncodec) and keeps the timestamp text of the current
    second."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = (-1, "")  # one tuple, swapped whole: worker threads log too

    def _ts(self, created: float, msecs: float) -> str:
        second = int(created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{stamp[1]}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._ts(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        line = jsoncodec.dumps(out, default=str)
        if line.isascii():
            return line.decode()
        # Escaped, as before: the line goes to stdout whatever its encoding.
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        extra = ""
        if isinstance(fields, dict):
            extra = " " + " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # What no line of ours prints, no record computes (the logging HOWTO's "Optimization"):
    # the caller's file and line (a stack walk per record), thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Hypercorn's access log would duplicate our per-delivery line without its fields.
    logging.getLogger("hypercorn.access").disabled = True


def fields(**kw: Any) -> dict[str, Any]:
    return {"fields": kw}
