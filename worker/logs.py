"""Log lines: readable text by default, one JSON object per line with `BLOBSCORE_LOG_FORMAT=json`.

A line about an image carries its facts as fields (`event(...)` below): job id, blob, service, outcome or code,
stage timings. The text format appends them as `key=value` after the message; the JSON format makes each a key
of the line's object, next to `ts`, `level`, `logger` and `message`. Both formats pass every finished line through
`redact`, a last guard in case a library ever logs a SAS token, an account key or a bearer token: blobscore itself
never logs a secret.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Literal

LogFormat = Literal["text", "json"]
# The LogRecord attribute carrying a line's fields (logging's `extra`).
FIELDS = "blobscore"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log every request (azure-core: each request and its headers at INFO; urllib3: each URL at DEBUG;
# Celery: two lines per task): at millions of images that would be most of the log and a share of the CPU.
# Failures, retries and rejections are logged by blobscore itself.
NOISY_LOGGERS = ("azure", "urllib3", "celery.app.trace", "celery.worker.strategy")
# `AccountKey=…`, `SharedAccessSignature=…` (connection strings), `sig=…` (SAS query), `Bearer …`: the whole match is
# replaced, keyword included. A value stops at a separator, a quote or a backslash, so a JSON line stays valid.
_SECRET = re.compile(
    r"(?i)\b(?:AccountKey|SharedAccessSignature|sig)=[^;&\s\"'\\]+|\bBearer\s+[A-Za-z0-9._~+/=-]+"
)
REDACTED = "[redacted]"


def redact(line: str) -> str:
    """`line` with anything that looks like a key, SAS signature or bearer token replaced."""
    return _SECRET.sub(REDACTED, line)


def event(**fields: Any) -> dict[str, Any]:
    """The `extra=` of a log call whose fields are facts to keep (None values are left out)."""
    return {FIELDS: {name: value for name, value in fields.items() if value is not None}}


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if not isinstance(value, int | float) else str(value)
    if text == "" or any(char.isspace() or char in "\"=" for char in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`: a person reads it; grep finds `job_id=…`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields: Mapping[str, object] | None = getattr(record, FIELDS, None)
        if fields:
            line += " " + " ".join(f"{name}={_text_value(value)}" for name, value in fields.items())
        return line

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, the line's fields, exc (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields: Mapping[str, object] | None = getattr(record, FIELDS, None)
        if fields:
            document.update((name, value) for name, value in fields.items() if name not in document)
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return redact(json.dumps(document, ensure_ascii=False, default=str))


def formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter of a `log_format` setting."""
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(level: str = "INFO", log_format: LogFormat = "text", stream: IO[str] | None = None) -> None:
    """Send every log line of the process to `stream` (stderr) in `log_format`, from `level` up, Python warnings
    included; the noisy libraries from WARNING up (or `level`, if higher)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # a library's warning becomes a line in the same format, not raw stderr text
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
