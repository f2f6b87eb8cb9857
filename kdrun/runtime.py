"""Device, precision (autocast, GradScaler), seeds, torch.compile, and DDP when launched by torchrun."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from kdrun.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    rank: int = 0  # DDP (torchrun): this process's rank among world_size
    world_size: int = 1
    cpu_group: object = None  # DDP: a gloo process group for small host-side agreements (stop flags, barriers)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs to MLflow, evaluates, saves and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

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

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module as DDP would train it: DistributedDataParallel when distributed (gradients all-reduced in
        backward; parameters a step leaves unused, such as BERT's pooler, allowed), else the module itself."""
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)

    def accumulating(self, model: torch.nn.Module, more_to_come: bool):
        """DDP: no gradient all-reduce for a micro-batch that more micro-batches of the same step follow."""
        if more_to_come and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def mean(self, values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-key means over the ranks (one all-reduce; used at log steps only)."""
        if not self.distributed or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=self.device) for k in keys])
        dist.all_reduce(stacked)
        return dict(zip(keys, stacked / self.world_size))

    def max_int(self, value: int) -> int:
        """The largest of the ranks' values (an int on the host; gloo, so no GPU sync), or `value` alone."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t.item())

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.cpu_group)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def make_runtime(device: str, precision: str) -> Runtime:
    """The run's device and precision. Under torchrun (WORLD_SIZE > 1) every process joins one DDP group (NCCL on
    GPUs, gloo on CPUs) and takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware.device=cuda but no CUDA GPU is visible to torch; use hardware=cpu")
    if device == "cpu" and precision == "fp16":
        raise ConfigError("hardware.precision=fp16 needs a GPU; on CPU use fp32 (or bf16)")
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; use hardware=gpu_fp16")
    dev = torch.device(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world == 1:
        return Runtime(dev, precision)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started {world} processes but this machine has {torch.cuda.device_count()} "
                              "GPU(s): use --nproc_per_node <= the GPU count")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():  # evaluation on rank 0 may keep the others waiting: a generous timeout
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    cpu_group = dist.new_group(backend="gloo") if device == "cuda" else None  # None: the default (gloo) group
    return Runtime(dev, precision, rank=rank, world_size=world, cpu_group=cpu_group)


def compile_model(model: torch.nn.Module) -> None:
    """torch.compile in place (nn.Module.compile: the module keeps its type, state dict and save_pretrained);
    dynamic shapes, since batches differ in length."""
    model.compile(dynamic=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loss_param_sync(rt: Runtime, params: List[torch.nn.Parameter]):
    """DDP for parameters outside the student (loss terms' projections): their gradients averaged over the
    ranks once per step, in one all-reduce; a no-op when not distributed or there are none."""
    grads = [p.grad for p in params if p.grad is not None]
    if not rt.distributed or not grads:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= rt.world_size
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
