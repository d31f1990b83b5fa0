"""Secrets never leave the process by value: credentials in URLs, presigned query strings, auth headers,
common token shapes, and the values of secret-named environment variables are replaced by ``***`` in
everything w2v-dist writes (config.yaml, checkpoints, metrics, logs, wandb).

Redaction by key name alone missed a token inside ``data.shard_command``, a ``user:token@`` URL or a
presigned query string. Pass secrets with ``${oc.env:VAR}``: the config is written with the interpolation,
not the value.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
SECRET_NAME_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
"""An environment variable whose name holds one of these is a secret: its value is redacted wherever it
shows."""
MIN_SECRET_LENGTH = 8
"""Shorter environment values are not redacted: they would match ordinary words and numbers."""

_PATTERNS = [
    # scheme://user:password@host  ->  scheme://***@host
    (re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@'\"\0]+:[^/\s@'\"\0]+@"),
     rf"\g<keep>{MASK}@"),
    # presigned / token query parameters: X-Amz-Signature=..., sig=..., token=..., access_token=...
    (re.compile(
        r"(?P<keep>[?&](?:X-Amz-[A-Za-z-]+|X-Goog-[A-Za-z-]+|sig|signature|token|access_token|api_key|"
        r"apikey|key|password|secret|credential)=)[^&\s'\"\0]+", re.IGNORECASE),
     rf"\g<keep>{MASK}"),
    # Authorization headers and bearer tokens
    (re.compile(r"(?P<keep>\bAuthorization\s*[:=]\s*+(?:Bearer|Basic|Token)?+\s*+)[^\s'\"\0]+",
                re.IGNORECASE),
     rf"\g<keep>{MASK}"),
    (re.compile(r"(?P<keep>\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\g<keep>{MASK}"),
    # common token shapes: Hugging Face, GitHub, AWS access keys, Slack, OpenAI-style keys
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), MASK),
    (re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"), MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), MASK),
]


def _secret_values() -> list[str]:
    values = {value for name, value in os.environ.items()
              if any(marker in name.upper() for marker in SECRET_NAME_MARKERS)
              and len(value) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)  # longest first: one secret may contain another


_INTERPOLATION = re.compile(r"\$\{[^{}]*\}")


def redact(text: str) -> str:
    """``text`` with every secret replaced by ``***`` (idempotent). ``${oc.env:VAR}`` is a reference, not a
    secret: it is kept (set aside while the patterns run, so that none of them matches across it)."""
    kept = _INTERPOLATION.findall(text)
    text = _INTERPOLATION.sub("\0", text)
    for value in _secret_values():
        text = text.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    for reference in kept:
        text = text.replace("\0", reference, 1)
    return text


def redact_values(value: Any) -> Any:
    """:func:`redact` applied to every string inside nested dicts, lists and tuples."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item) for item in value)
    return value
