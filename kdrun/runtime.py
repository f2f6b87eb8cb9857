"""Device, precision (autocast, GradScaler) and seeds."""
from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from kdrun.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    @property
    def teacher_dtype(self) -> torch.dtype:
        """A frozen teacher's weights: the profile's low precision (bf16/fp16), else fp32."""
        return _DTYPES[self.precision]

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Active only for fp16 (bf16 and fp32 need no loss scaling)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def make_runtime(device: str, precision: str) -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware.device=cuda but no CUDA GPU is visible to torch; use hardware=cpu")
    if device == "cpu" and precision == "fp16":
        raise ConfigError("hardware.precision=fp16 needs a GPU; on CPU use fp32 (or bf16)")
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; use hardware=gpu_fp16")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(torch.device(device), precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(obj, device: torch.device):
    """Tensors in (nested) dicts/lists to the device, non-blocking."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
