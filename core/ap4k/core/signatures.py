"""Signing deliveries: Standard Webhooks 1.0, and ap4k's older Ap4k-Signature for one version.

Standard Webhooks (https://www.standardwebhooks.com/) signs "<id>.<timestamp>.<body>" with
HMAC-SHA256 and sends one `v1,<base64>` entry per secret in `webhook-signature`, so a queue with
two secrets (during a rotation) is verified by receivers holding either one. Receivers use the
specification's libraries; ap4k only signs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the specification allows 24 to 64


def new_secret() -> str:
    """A fresh secret in the specification's form: `whsec_` and the base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key a `whsec_…` secret stands for (ValueError if it is not one)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a signing secret starts with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a signing secret is whsec_ and base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a signing secret's key is 24 to 64 bytes")
    return key


def webhook_signature(keys: tuple[bytes, ...], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<base64 HMAC-SHA256>` per key."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def legacy_signature(secret: str, timestamp: int, body: bytes) -> str:
    """Ap4k-Signature (deprecated): HMAC-SHA256 over "<timestamp>.<body>", hex."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"
