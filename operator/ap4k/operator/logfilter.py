"""Keep the operator's log to one line per real change.

kopf logs at INFO each time a handler, daemon or start-up activity returns ("Handler
'deployment_event' succeeded.") and each time a cause is done ("Resuming is processed: 1
succeeded; 0 failed."). With event handlers watching the children, that is a line for every
Deployment status update: in a short run 39 of 66 lines. The handlers log what they changed
themselves (scaled, restored a drifted child, reconciled children), so these progress lines
are demoted to DEBUG: they are still there with `--log-level debug`. Failures and retries
are never touched.
"""

from __future__ import annotations

import logging
import re

# The texts of kopf 1.x (kopf/_core/actions/execution.py and _core/reactor/processing.py).
_PROGRESS = re.compile(
    r"^((Handler|Activity|Daemon|Timer) '[^']+' succeeded\."
    r"|[A-Z][a-z]+ is processed: \d+ succeeded; 0 failed\.)$"
)


class DemoteKopfProgress(logging.Filter):
    """kopf's INFO progress lines become DEBUG lines (shown only when DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and _PROGRESS.match(record.getMessage()):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def install() -> None:
    """Attach the filter to the root logger's handlers (kopf.configure's): kopf logs these
    lines on many loggers (kopf.objects, kopf.activities.<name>), and a logger's own filters
    do not see what its children log."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, DemoteKopfProgress) for f in handler.filters):
            handler.addFilter(DemoteKopfProgress())
