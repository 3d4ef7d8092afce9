"""JSON log lines on stderr: one object per line, ready for any log shipper."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime

import orjson

# Tokens travel in WebSocket URLs (`?token=`) and headers; whatever logs a URL or a
# header (uvicorn does, for every WebSocket) must not put a credential in the log.
_SECRETS = re.compile(r"(token=|access_token=|Bearer\s+)[^\s&\"']+", re.IGNORECASE)


def redact(text: str) -> str:
    return _SECRETS.sub(r"\1[redacted]", text)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


class _AlembicPreamble(logging.Filter):
    """Drops the two lines Alembic prints whenever it opens a migration context.

    Every start opens one to apply migrations and another to check the schema revision, so
    they would print twice on every start while saying nothing an operator can act on; the
    "Running upgrade …" lines, which do, still show.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Context impl ", "Will assume "))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    logging.getLogger("alembic.runtime.migration").addFilter(_AlembicPreamble())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Access logs per request would dominate the output under load; errors still show.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
