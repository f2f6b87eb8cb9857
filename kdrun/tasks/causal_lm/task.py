"""Causal LM: documents packed into fixed-length token blocks; next-token logits; held-out perplexity of
student and teacher, token-level top-1 agreement and mean KL(teacher || student) per token."""
from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Sequence

import torch

from kdrun import progress
from kdrun.errors import DataError
from kdrun.losses.functional import forward_kl
from kdrun.tasks.causal_lm import FAMILY


def pack(texts: Sequence[str], tokenizer, block_size: int, max_blocks=None) -> torch.Tensor:
    """Tokenise documents, join them with the EOS token and cut the stream into [N, block_size] blocks
    (the tail that does not fill a block is dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the teacher's tokenizer has no EOS token to separate packed documents")
    ids: List[int] = []
    need = None if max_blocks is None else max_blocks * block_size
    for chunk in range(0, len(texts), 512):
        for doc in tokenizer(list(texts[chunk:chunk + 512]), add_special_tokens=False)["input_ids"]:
            ids += doc + [eos]
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[:n * block_size], dtype=torch.long).view(n, block_size)


class Collate:
    """Blocks -> input ids for both models (they share a tokenizer), next-token labels and a loss mask."""

    def __init__(self, online: bool):
        self.online = online

    def __call__(self, examples: Sequence) -> Dict:
        ids = torch.stack([ex[0] for ex in examples])
        feats = {"input_ids": ids}
        batch = {"student": feats, "labels": ids[:, 1:], "loss_mask": torch.ones_like(ids[:, 1:], dtype=torch.bool),
                 "size": len(examples)}
        if self.online:
            batch["teacher"] = feats
        else:
            batch["teacher_out"] = {k: torch.stack([ex[1][k] for ex in examples]) for k in examples[0][1]}
        return batch


class CausalLMTask:
    name, primary = FAMILY.name, FAMILY.primary

    def __init__(self, data, teacher, student, runtime, eval_batch_size: int):
        self.teacher, self.student, self.rt = teacher, student, runtime
        self.eval_batch_size = max(1, eval_batch_size)
        tok = teacher.tokenizer
        self.train_blocks = pack(data.train_texts, tok, data.block_size, data.max_train_blocks)
        self.eval_blocks = pack(data.eval_texts, tok, data.block_size, data.max_eval_blocks)
        if len(self.train_blocks) == 0 or len(self.eval_blocks) == 0:
            raise DataError(f"{data.source}: {len(self.train_blocks)} training and {len(self.eval_blocks)} held-out "
                            f"blocks of data.block_size={data.block_size} tokens; both must be non-empty")
        data.stats.update(train_blocks=len(self.train_blocks), eval_blocks=len(self.eval_blocks),
                          train_tokens=self.train_blocks.numel())
        self.data = data

    def prepare_student(self, student, hardware: Dict) -> Dict[str, float]:
        """Packed blocks of one length: nothing to pad or tokenise ahead."""
        return {}

    def loss_context(self) -> Dict:
        return {}

    def examples(self) -> list:
        return [(block,) for block in self.train_blocks]

    def lengths(self) -> List[int]:
        return [self.data.block_size] * len(self.train_blocks)

    def fingerprint(self) -> str:
        """SHA-256 of the packed training blocks (token ids), which already reflect the tokenizer."""
        return hashlib.sha256(self.train_blocks.numpy().tobytes()).hexdigest()

    @torch.inference_mode()
    def teacher_outputs(self, teacher) -> Dict[str, torch.Tensor]:
        """The teacher's top-k logits per position (teacher.top_k), their token ids and the log-normaliser
        (logsumexp over the full vocabulary): (block_size - 1) * (2k + 1) * 4 bytes per block."""
        parts = []
        for i in range(0, len(self.train_blocks), self.eval_batch_size):
            blocks = self.train_blocks[i:i + self.eval_batch_size].to(self.rt.device)
            with self.rt.autocast():
                logits = teacher.logits({"input_ids": blocks}).float()
            values, ids = logits.topk(teacher.top_k, dim=-1)
            parts.append({"topk_logits": values.cpu(), "topk_ids": ids.int().cpu(),  # int32: half of int64
                          "log_normaliser": torch.logsumexp(logits, dim=-1).cpu()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def attach(self, outputs: Dict[str, torch.Tensor]) -> list:
        """Blocks with the teacher's top-k log-probs (top-k logits minus the log-normaliser)."""
        logprobs = outputs["topk_logits"] - outputs["log_normaliser"].unsqueeze(-1)
        return [(b, {"topk_logprobs": logprobs[j], "topk_ids": outputs["topk_ids"][j]})
                for j, b in enumerate(self.train_blocks)]

    def collate(self, online: bool) -> Collate:
        return Collate(online)

    @torch.inference_mode()
    def evaluate(self, model, who: str, final: bool = True) -> Dict[str, float]:
        """Perplexity = exp(mean next-token NLL) over every held-out token; for the student also top-1
        agreement with the teacher and the mean KL(teacher || student) per token (full vocabulary)."""
        was_training = model.training
        model.eval()
        nll = agree = kl = 0.0
        tokens = 0
        for i in progress.bar(range(0, len(self.eval_blocks), self.eval_batch_size), desc="evaluate", unit="batch"):
            ids = self.eval_blocks[i:i + self.eval_batch_size].to(self.rt.device)
            with self.rt.autocast():
                logits = model.logits({"input_ids": ids}).float()
                teacher_logits = self.teacher.logits({"input_ids": ids}).float() if who == "student" else None
            labels = ids[:, 1:]
            n = labels.numel()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     reduction="sum").item()
            if teacher_logits is not None:
                agree += (logits.argmax(-1) == teacher_logits.argmax(-1)).sum().item()
                kl += forward_kl(logits, teacher_logits).item() * n
            tokens += n
        model.train(was_training)
        metrics = {"perplexity": math.exp(nll / tokens), "nll": nll / tokens}
        if who == "student":
            metrics.update(top1_agreement=agree / tokens, kl_to_teacher=kl / tokens)
        return metrics

    def eval_size(self) -> int:
        """Held-out examples one evaluation goes through (for the per-example latency metric)."""
        return len(self.eval_blocks)

    def eval_fingerprint(self) -> str:
        """SHA-256 of the held-out token blocks."""
        return hashlib.sha256(self.eval_blocks.numpy().tobytes()).hexdigest()

    def model_examples(self) -> list:
        """The logged model's input example: the start of a held-out text, as a prompt."""
        return [" ".join(self.data.eval_texts[0].split()[:12])]

    def describe(self) -> str:
        return (f"held-out blocks: {len(self.eval_blocks)} x {self.data.block_size} tokens, "
                f"training blocks: {len(self.train_blocks)}")
