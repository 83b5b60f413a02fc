"""Names that several components must agree on, written once.

A queue name is checked by the server (the API's path parameter), by the operator (an
AsyncQueue's `spec.queues[].name`) and by the CRD's schema, so that a name the server would
refuse is refused at admission instead of leaving the resource `QueuesConfigured=False`.
tests/operator/test_crd_apiserver.py compares the CRD's pattern with this one.
"""

from __future__ import annotations

import re

QUEUE_NAME_MAX_LENGTH = 128
# Letters, digits, dot, underscore and dash, starting with a letter or digit; URL-safe as a
# path segment, so no escaping is ever needed in /v1/queues/{queue}.
QUEUE_NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{QUEUE_NAME_MAX_LENGTH - 1}}}$"
QUEUE_NAME = re.compile(QUEUE_NAME_PATTERN)
