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


_ASSIGNMENT_IN_TEXT = re.compile(r"(?:(?<=^)|(?<=[\s\[,'\"(]))([+~]*)([\w.@/-]+)=([^\s,'\"\])]+)")


def _assignment(m: "re.Match") -> str:
    # (a bare `key=value` in running text is the words, as in "settings are key=value overrides", not a secret)
    secret = secret_key(m.group(2)) and m.group(2) != "key"
    return f"{m.group(1)}{m.group(2)}={REDACTED}" if secret else m.group(0)


def redact_text(text: str) -> str:
    """A string with every credential-looking part replaced (URI passwords, known token formats, bearer headers, and
    `key=value` overrides whose key names a secret, as a launcher's log line lists them)."""
    text = _ASSIGNMENT_IN_TEXT.sub(_assignment, text)
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


class _RedactingStream:
    """A text stream that redacts what is written through it, line by line (a credential is never split across two
    writes of one line: partial lines are held until their newline, or a flush)."""

    def __init__(self, stream):
        self._stream, self._held = stream, ""

    def write(self, text: str) -> int:
        n = len(text)
        text = self._held + str(text)
        head, nl, self._held = text.rpartition("\n")
        if nl:
            self._stream.write(redact_text(head + nl))
        if len(self._held) > 4096 or "\r" in self._held:  # progress bars redraw a line without ending it
            self._stream.write(redact_text(self._held))
            self._held = ""
        return n

    def flush(self) -> None:
        if self._held:
            self._stream.write(redact_text(self._held))
            self._held = ""
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def guard_output() -> None:
    """From here on, what this process prints or logs is redacted: stdout and stderr (MLflow's "View run ... at:
    URL" line, Hydra's "Error executing job with overrides", tracebacks) and every log record, whichever handler
    writes it (the console, Hydra's job log file). Idempotent; call it first thing in an entry point, and in each
    launcher worker process."""
    import logging
    import sys
    import traceback

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream))
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_kdrun_redacts", False):
        return

    def redacting(*args, **kwargs):
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: logging reports it as it would
            return record
        record.msg, record.args = redact_text(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info))).rstrip("\n")
        return record

    redacting._kdrun_redacts = True
    logging.setLogRecordFactory(redacting)


def redact_yaml_file(path) -> None:
    """A YAML file (Hydra's .hydra/config.yaml, hydra.yaml, overrides.yaml, multirun.yaml) rewritten with secret keys'
    values and credential-looking strings (`key=value` overrides among them) redacted; unchanged files are left be."""
    from pathlib import Path

    import yaml

    f = Path(path)
    try:
        text = f.read_text()
        tree = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return

    def walk(node, key=""):
        if isinstance(node, dict):
            return {k: (REDACTED if secret_key(k) and v is not None and not isinstance(v, (dict, list)) else walk(v, k))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str):
            return redact_arg(node)
        return node

    clean = walk(tree)
    if clean != tree:
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text(yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))
        tmp.replace(f)
