"""Where a model comes from: a local directory, the local Hugging Face cache, or the hub.

Hub names stay real (transformers downloads them as usual); without network and without a cached
copy, the user gets one message naming the model and the `<role>.path=/local/dir` fix, instead of
transformers' retries and a traceback.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from kdrun.errors import ModelLoadError

_TRUTHY = {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host does not accept a TCP connection."""
    if any(os.environ.get(k, "").lower() in _TRUTHY for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_source(role: str, name: Optional[str], path: Optional[str]) -> str:
    """A local directory or a hub name that from_pretrained can load now; else ModelLoadError."""
    if path:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ModelLoadError(f"{role}.path={path}: no such directory")
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{role}.path={path}: no config.json there; expected a Hugging Face model directory "
                "(what save_pretrained writes)"
            )
        return str(p)
    if not name:
        raise ModelLoadError(f"{role}: set {role}.name (a hub name) or {role}.path=/local/dir")
    local = Path(name).expanduser()
    if local.is_dir():
        return resolve_source(role, None, str(local))
    from huggingface_hub import snapshot_download

    try:
        cached = snapshot_download(repo_id=name, local_files_only=True)
        if (Path(cached) / "config.json").is_file():
            return cached
    except Exception:  # not cached (or not a valid repo id): decided below
        pass
    if hub_reachable():
        return name
    raise ModelLoadError(
        f"{role} model '{name}' is not available offline: the Hugging Face hub ({hub_endpoint()}) "
        f"cannot be reached and there is no copy in the local cache. Download it where the hub is "
        f"reachable (e.g. `huggingface-cli download {name} --local-dir DIR`) and pass {role}.path=DIR"
    )


def load_pretrained(role: str, source: str, model_class: str = "AutoModel"):
    """(model, tokenizer) from a directory or hub name, with readable errors."""
    import transformers

    cls = getattr(transformers, model_class)
    try:
        model = cls.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{role}: cannot load '{source}' with transformers.{model_class}: {first}. "
            f"Check {role}.name, or pass a local Hugging Face model directory with {role}.path=DIR"
        ) from e
    return model, tokenizer
