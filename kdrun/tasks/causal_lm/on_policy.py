"""On-policy distillation of a causal LM (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes"): with `train.on_policy.fraction=λ` the student continues a share λ of each
batch's prompts with its own samples, the teacher scores those tokens, and the loss terms train on them, masked to
the generated tokens. A student trained only on a fixed corpus never sees the states its own mistakes lead to; on
its own samples it does (and the "teacher hacking" gap between the two, kdrun logs at each evaluation:
eval/student/kl_to_teacher vs eval/student/kl_to_teacher_on_samples).

    hook = OnPolicy(fraction=0.5, temperature=1.0, top_p=1.0, max_new_tokens=32, seed=42, eos_id=2, pad_id=2, runtime=rt)
    batch = hook(student, batch, step, micro)   # in the training step, before the teacher and the student run

Generation runs under inference_mode, in the hardware profile's precision, with the KV cache (transformers'
generate), the student in eval mode (no dropout); its time is logged apart (train/generate_seconds,
train/generated_tokens_per_s). Which rows, and the samples, are drawn from generators seeded by (seed, step) inside
a forked RNG: the training's own random state is untouched, so λ=0 is the off-policy path bit for bit, and a resumed
run draws the same samples.
"""
from __future__ import annotations

import math
import random
import time
from typing import Dict, List, Sequence

import torch


def sample(model, prompts: Sequence[torch.Tensor], *, temperature: float, top_p: float, max_new_tokens: int,
           eos_id: int, pad_id: int, seed: int, runtime) -> List[torch.Tensor]:
    """The model's continuation of each prompt (token ids on the CPU, cut after the first EOS, which is kept), by
    transformers' generate: left-padded prompts, KV cache, sampling at `temperature` and `top_p` (temperature 0:
    greedy), max_new_tokens each. Deterministic for a seed; the caller's RNG state is left as it was."""
    hf = getattr(model, "module", model).model  # kdrun's CausalLM (DDP-wrapped or not) -> the transformers model
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[r, longest - len(p):], mask[r, longest - len(p):] = p, 1
    was_training = hf.training
    hf.eval()
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(), runtime.autocast():
            torch.manual_seed(seed)
            greedy = temperature <= 0
            out = hf.generate(input_ids=ids.to(runtime.device), attention_mask=mask.to(runtime.device),
                              do_sample=not greedy, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=eos_id, use_cache=True,
                              **({} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}))
    finally:
        hf.train(was_training)
    gen = []
    for row in out[:, longest:].cpu():
        ends = (row == eos_id).nonzero()
        gen.append(row[:int(ends[0, 0]) + 1] if len(ends) else row)
    return [g if len(g) else torch.tensor([eos_id]) for g in gen]


def continued(prompt: torch.Tensor, generated: torch.Tensor):
    """(token ids, trained flags) of a prompt and the student's continuation of it: the loss on the continuation only."""
    trained = torch.cat([torch.zeros(len(prompt), dtype=torch.bool), torch.ones(len(generated), dtype=torch.bool)])
    return torch.cat([prompt, generated]), trained


class OnPolicy:
    """The training step's hook: replaces a share `fraction` of a causal-LM batch's rows by their prompt and the
    student's continuation (loss on the continuation only)."""

    def __init__(self, *, fraction: float, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 eos_id: int, pad_id: int, runtime):
        self.fraction, self.temperature, self.top_p = fraction, temperature, top_p
        self.max_new_tokens, self.seed, self.eos_id, self.pad_id, self.rt = max_new_tokens, seed, eos_id, pad_id, runtime
        self.seconds = self.tokens = self.rows = self.seen = 0.0

    def rows_for(self, step: int, micro: int, size: int) -> List[int]:
        """Which rows of this micro-batch the student continues: fraction x size of them on average (the fractional
        part drawn), chosen at random, from a generator of (seed, step, micro-batch) alone."""
        rng = random.Random(f"on-policy/{self.seed}/{step}/{micro}")
        share = self.fraction * size
        n = int(math.floor(share)) + (rng.random() < share - math.floor(share))
        return sorted(rng.sample(range(size), n))

    def __call__(self, student, batch: Dict, step: int, micro: int = 0) -> Dict:
        """The collated (CPU) batch with its chosen rows replaced; the batch itself when none is chosen."""
        from kdrun.tasks.causal_lm.batches import collate_rows

        self.seen += batch["size"]
        rows = self.rows_for(step, micro, batch["size"]) if self.fraction > 0 else []
        if not rows:
            return batch
        ids, trained = batch["student"]["input_ids"], torch.nn.functional.pad(batch["loss_mask"], (1, 0))
        lengths, prompt_len = batch["length"].tolist(), batch["prompt_len"].tolist()
        prompts = [ids[r, :prompt_len[r]] for r in rows]
        t0 = time.perf_counter()
        gen = sample(student, prompts, temperature=self.temperature, top_p=self.top_p,
                     max_new_tokens=self.max_new_tokens, eos_id=self.eos_id, pad_id=self.pad_id,
                     seed=self.seed * 1_000_003 + step * 1009 + micro, runtime=self.rt)
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(len(g) for g in gen)
        self.rows += len(rows)
        new_ids = [ids[r, :lengths[r]] for r in range(batch["size"])]
        new_trained = [trained[r, :lengths[r]] for r in range(batch["size"])]
        for r, p, g in zip(rows, prompts, gen):  # the prompt, then the student's tokens: the only trained ones
            new_ids[r], new_trained[r] = continued(p, g)
        out = collate_rows(new_ids, new_trained, self.pad_id)
        out.update(teacher=out["student"],  # an online teacher (validated): it scores the student's tokens
                   size=batch["size"], prompt_len=batch["prompt_len"],
                   length=torch.tensor([len(x) for x in new_ids]))
        return out

    def logs(self) -> Dict[str, float]:
        """Since the last call: seconds spent generating, generated tokens per second of it, share of rows."""
        out = {"generate_seconds": self.seconds,
               "generated_tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
               "on_policy_share": self.rows / self.seen if self.seen else 0.0}
        self.seconds = self.tokens = self.rows = self.seen = 0.0
        return out
