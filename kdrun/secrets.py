"""Keep credentials out of MLflow: params, tags, logged configs and command lines are redacted before logging.

A value is replaced by REDACTED when its key names a secret (token, password, secret, credential, api key,
`*_KEY`, `*_TOKEN`, auth), and a string is rewritten wherever it looks like a credential itself: the password
of a URI (`scheme://user:password@host` keeps the user and host), Hugging Face / OpenAI / GitHub / Slack /
AWS access tokens, JSON web tokens, and `Bearer` headers. Pure functions, no config.
"""
from __future__ import annotations

import re
from typing import Any

REDACTED = "***REDACTED***"

_SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|credential|api[_-]?key|auth|private[_-]?key|(^|[_.-])key)$",
                         re.IGNORECASE)
_URI_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*):([^/\s@]+)@")
_TOKENS = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})")
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
_ASSIGNMENT = re.compile(r"^([+~]*)([\w.@/-]+)=(.*)$", re.DOTALL)


def secret_key(key: str) -> bool:
    """Whether a (dotted) key names a credential: its last part ends in token, password, key, secret, ..."""
    last = str(key).rsplit(".", 1)[-1]
    return bool(_SECRET_KEY.search(last))


def redact_text(text: str) -> str:
    """A string with every credential-looking part replaced (URI passwords, known token formats, bearer headers)."""
    text = _URI_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    text = _TOKENS.sub(REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def redact_arg(arg: str) -> str:
    """A command-line argument or Hydra override: `key=value` with a secret key loses its value."""
    m = _ASSIGNMENT.match(arg)
    if m and secret_key(m.group(2)):
        return f"{m.group(1)}{m.group(2)}={REDACTED}"
    return redact_text(arg)


def redact(tree: Any, key: str = "") -> Any:
    """A copy of nested dicts/lists with secret keys' values and credential-looking strings redacted."""
    if isinstance(tree, dict):
        return {k: (REDACTED if secret_key(k) and v is not None else redact(v, k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact(v, key) for v in tree)
    if isinstance(tree, str):
        return redact_text(tree)
    return tree
