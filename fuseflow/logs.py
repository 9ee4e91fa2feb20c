"""Logging setup: human-readable lines on a terminal, one JSON object per line for services
(``--log-format json`` or ``FUSEFLOW_LOG_FORMAT=json``), so log shippers need no parsing rules."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in getattr(record, "fields", {}).items():
            out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str | None = None, level: str | None = None) -> None:
    fmt = fmt or os.environ.get("FUSEFLOW_LOG_FORMAT", "text")
    level = (level or os.environ.get("FUSEFLOW_LOG_LEVEL", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter that drowns the progress bar.
    for noisy in ("DeepSpeed", "deepspeed", "transformers", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars on every load
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
