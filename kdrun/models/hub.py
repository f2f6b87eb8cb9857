"""Where a model comes from: a local directory, the local Hugging Face cache, or the hub.

Hub names stay real (transformers downloads them as usual); without network and without a cached
copy, the user gets one message naming the model and the `<role>.path=/local/dir` fix, instead of
transformers' retries and a traceback.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from kdrun.errors import ModelLoadError
from kdrun.store import built_by_rank_0, cache_root, cached, publish, staging_dir

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


def resolve_source(role: str, name: Optional[str], path: Optional[str], gguf_file: Optional[str] = None) -> str:
    """A local directory or a hub name that from_pretrained can load now; else ModelLoadError."""
    if path:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ModelLoadError(f"{role}.path={path}: no such directory")
        if gguf_file:
            if not (p / gguf_file).is_file():
                found = sorted(f.name for f in p.glob("*.gguf"))
                raise ModelLoadError(f"{role}.gguf_file={gguf_file}: no such file in {p} (GGUF files there: {found})")
        elif not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{role}.path={path}: no config.json there; expected a Hugging Face model directory "
                "(what save_pretrained writes)"
            )
        return str(p)
    if not name:
        raise ModelLoadError(f"{role}: set {role}.name (a hub name) or {role}.path=/local/dir")
    from kdrun.models import tiny

    if tiny.is_tiny(name):  # kdrun's own tiny random models: built locally on first use, never from the hub
        return tiny.ensure(name)
    local = Path(name).expanduser()
    if local.is_dir():
        return resolve_source(role, None, str(local), gguf_file)
    from huggingface_hub import snapshot_download

    try:
        cached = snapshot_download(repo_id=name, local_files_only=True)
        if (Path(cached) / (gguf_file or "config.json")).is_file():
            return cached
    except Exception:  # not cached (or not a valid repo id): decided below
        pass
    if hub_reachable():
        return name
    raise ModelLoadError(
        f"{role} model '{name}' is not available offline: the Hugging Face hub ({hub_endpoint()}) "
        f"cannot be reached and there is no copy in the local cache. Download it where the hub is "
        f"reachable (`hf download {name} --local-dir DIR`, the command huggingface_hub installs) and pass "
        f"{role}.path=DIR"
    )


def _gguf_as_hf_dir(role: str, source: str, gguf_file: str, model_class: str) -> str:
    """A GGUF checkpoint, de-quantised once into a Hugging Face directory under the cache (keyed by the
    file's path, size and mtime), so later runs and every job of a sweep load it in about a second."""
    import transformers

    f = Path(source) / gguf_file
    st = f.stat() if f.is_file() else None
    key = hashlib.sha1(f"{f.resolve() if st else source}|{gguf_file}|{st.st_size if st else ''}|"
                       f"{st.st_mtime_ns if st else ''}|{model_class}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{Path(gguf_file).stem}-{key}"
    if cached(out) or built_by_rank_0(out):
        return str(out)
    cls = getattr(transformers, model_class)
    try:
        model = cls.from_pretrained(source, gguf_file=gguf_file)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelLoadError(f"{role}: cannot load GGUF file '{gguf_file}' from '{source}': {_first_line(e)}. "
                             "GGUF loading needs the packages gguf and accelerate (`make install`)") from e
    # the weights are de-quantised (plain fp32 tensors) but transformers still marks the model as GGUF-quantized,
    # which save_pretrained refuses: drop the marker so it saves as an ordinary checkpoint
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.is_quantized = False
    tmp = staging_dir(out)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish(tmp, out, str(f))
    return str(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_pretrained(role: str, source: str, model_class: str = "AutoModel", gguf_file: Optional[str] = None,
                    **kwargs):
    """(model, tokenizer) from a directory or hub name (or a GGUF file in it), with readable errors."""
    import transformers

    if gguf_file:
        source = _gguf_as_hf_dir(role, source, gguf_file, model_class)
    cls = getattr(transformers, model_class)
    try:
        model = cls.from_pretrained(source, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"{role}: cannot load '{source}' with transformers.{model_class}: {_first_line(e)}. "
            f"Check {role}.name, or pass a local Hugging Face model directory with {role}.path=DIR"
        ) from e
    return model, tokenizer
