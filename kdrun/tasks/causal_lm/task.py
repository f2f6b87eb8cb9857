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
from kdrun.data.batching import to_device
from kdrun.tasks.causal_lm import FAMILY
from kdrun.tasks.causal_lm.batches import collate_rows


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


def encode_chat(tokenizer, rec: dict, max_length: int):
    """(token ids, trained flags) of one conversation (kdrun/data/lm.py): a prompt/completion pair joined as it is,
    with EOS after the completion, or chat messages rendered by the tokenizer's chat template. A token is trained
    when it starts inside the completion (or an assistant message from rec["train_from"] on, its end-of-turn tokens
    included). Cut to max_length tokens; None when no trained token is left."""
    if "messages" in rec:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the student's tokenizer has no chat template to render `messages` with; use plain "
                            "prompt/completion strings (data.format=prompt_completion) or a student with a chat template")
        msgs, spans = rec["messages"], []
        render = lambda m, gen=False: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
        text = render(msgs)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or i < rec["train_from"]:
                continue
            start, upto = render(msgs[:i], True) if i else "", render(msgs[:i + 1])
            if not (upto.startswith(start) and text.startswith(upto)):
                raise DataError("the chat template does not render a conversation's beginning as the beginning of the "
                                "whole conversation, so kdrun cannot tell which tokens are the assistant's; use "
                                "data.format=prompt_completion")
            spans.append((len(start), len(upto)))
        eos = []
    else:
        text = rec["prompt"] + rec["completion"]
        spans, eos = [(len(rec["prompt"]), len(text) + 1)], [tokenizer.eos_token_id]  # (+1: the EOS after it)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + eos
    starts = [a for a, _ in enc["offset_mapping"]] + [len(text)] * len(eos)
    trained = [any(lo <= a < hi for lo, hi in spans) for a in starts]
    ids, trained = ids[:max_length], trained[:max_length]
    if not any(trained[1:]):
        return None
    return ids, trained


class Collate:
    """Examples -> input ids for both models (they share a tokenizer), next-token labels and a loss mask; each
    example's prompt length and trained flags ride along for on-policy generation (kdrun/tasks/causal_lm/on_policy.py)."""

    def __init__(self, online: bool, pad_id: int):
        self.online, self.pad_id = online, pad_id

    def __call__(self, examples: Sequence) -> Dict:
        batch = collate_rows([ex[0] for ex in examples], [ex[1] for ex in examples], self.pad_id)
        batch.update(size=len(examples), prompt_len=torch.tensor([ex[2] for ex in examples]),
                     length=torch.tensor([len(ex[0]) for ex in examples]))
        if self.online:
            batch["teacher"] = batch["student"]
        else:
            t = batch["student"]["input_ids"].shape[1] - 1  # (cached rows are padded to the longest example)
            batch["teacher_out"] = {k: torch.stack([ex[3][k][:t] for ex in examples]) for k in examples[0][3]}
        return batch


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


class CausalLMTask:
    name, primary = FAMILY.name, FAMILY.primary
    sampling = None  # train.on_policy (set by the family): the KL on the student's own samples at each evaluation

    def __init__(self, data, teacher, student, runtime, eval_batch_size: int):
        self.teacher, self.student, self.rt = teacher, student, runtime
        self.eval_batch_size = max(1, eval_batch_size)
        tok = teacher.tokenizer
        self.pad_id = _pad_id(tok)
        self.chat = data.train_chats is not None
        if self.chat:  # one example per conversation; the prompt is what comes before its first trained token
            self.train, dropped = self._encode(data.train_chats, tok, data.max_length)
            self.eval, dropped_eval = self._encode(data.eval_chats, tok, data.max_length)
            data.stats.update(train_examples=len(self.train), eval_examples=len(self.eval),
                              dropped_untrained=dropped + dropped_eval)
            what = f"conversations of at most data.max_length={data.max_length} tokens with a trained token"
        else:  # packed blocks: every token but the first is trained; the prompt is the first half
            blocks = pack(data.train_texts, tok, data.block_size, data.max_train_blocks)
            held = pack(data.eval_texts, tok, data.block_size, data.max_eval_blocks)
            self.train_blocks = blocks
            self.train, self.eval = self._blocks(blocks), self._blocks(held)
            data.stats.update(train_blocks=len(self.train), eval_blocks=len(self.eval))
            what = f"blocks of data.block_size={data.block_size} tokens"
        if not self.train or not self.eval:
            raise DataError(f"{data.source}: {len(self.train)} training and {len(self.eval)} held-out {what}; both "
                            "must be non-empty")
        data.stats.update(train_tokens=sum(len(x[0]) for x in self.train),
                          trained_tokens=sum(int(x[1][1:].sum()) for x in self.train))
        self.data = data

    @staticmethod
    def _blocks(blocks: torch.Tensor) -> list:
        if len(blocks) == 0:
            return []
        trained = torch.ones(blocks.shape[1], dtype=torch.bool)
        trained[0] = False
        return [(b, trained, blocks.shape[1] // 2) for b in blocks]

    @staticmethod
    def _encode(chats, tok, max_length: int):
        out, dropped = [], 0
        for rec in chats:
            enc = encode_chat(tok, rec, max_length)
            if enc is None:
                dropped += 1
                continue
            ids, trained = torch.tensor(enc[0], dtype=torch.long), torch.tensor(enc[1], dtype=torch.bool)
            out.append((ids, trained, int(trained.nonzero()[0, 0])))
        return out, dropped

    def prepare_student(self, student, hardware: Dict) -> Dict[str, float]:
        """Tokenised when the task was built: nothing to pad or tokenise ahead."""
        return {}

    def loss_context(self) -> Dict:
        return {}

    def examples(self) -> list:
        return list(self.train)

    def lengths(self) -> List[int]:
        return [len(x[0]) for x in self.train]

    def fingerprint(self) -> str:
        """SHA-256 of the training examples as token ids (which already reflect the tokenizer), and for
        conversations of which tokens are trained."""
        if not self.chat:
            return hashlib.sha256(self.train_blocks.numpy().tobytes()).hexdigest()
        h = hashlib.sha256(b"chat")
        for ids, trained, _ in self.train:
            h.update(ids.numpy().tobytes() + b"|" + trained.numpy().tobytes() + b"\x1e")
        return h.hexdigest()

    @torch.inference_mode()
    def teacher_outputs(self, teacher) -> Dict[str, torch.Tensor]:
        """The teacher's top-k logits per position (teacher.top_k), their token ids and the log-normaliser
        (logsumexp over the full vocabulary): (length - 1) * (2k + 1) * 4 bytes per example, every example padded
        to the longest."""
        parts, longest = [], max(len(x[0]) for x in self.train)
        for i in range(0, len(self.train), self.eval_batch_size):
            rows = self.train[i:i + self.eval_batch_size]
            feats = collate_rows([x[0] for x in rows], [x[1] for x in rows], self.pad_id)["student"]
            with self.rt.autocast():
                logits = teacher.logits({k: v.to(self.rt.device) for k, v in feats.items()}).float()
            pad = longest - 1 - logits.shape[1]
            if pad:
                logits = torch.nn.functional.pad(logits, (0, 0, 0, pad))
            values, ids = logits.topk(teacher.top_k, dim=-1)
            parts.append({"topk_logits": values.cpu(), "topk_ids": ids.int().cpu(),  # int32: half of int64
                          "log_normaliser": torch.logsumexp(logits, dim=-1).cpu()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def attach(self, outputs: Dict[str, torch.Tensor]) -> list:
        """Examples with the teacher's top-k log-probs (top-k logits minus the log-normaliser); none for a loss that
        reads no teacher (no outputs)."""
        if not outputs:
            return [(*x, {}) for x in self.train]
        logprobs = outputs["topk_logits"] - outputs["log_normaliser"].unsqueeze(-1)
        return [(*x, {"topk_logprobs": logprobs[j], "topk_ids": outputs["topk_ids"][j]})
                for j, x in enumerate(self.train)]

    def collate(self, online: bool) -> Collate:
        return Collate(online, self.pad_id)

    @torch.inference_mode()
    def evaluate(self, model, who: str, final: bool = True) -> Dict[str, float]:
        """Perplexity = exp(mean next-token NLL) over every held-out trained token (packed text: every token; chat:
        the completions); for the student also top-1 agreement with the teacher and the mean KL(teacher ||
        student) per token (full vocabulary), on the held-out data and, with train.on_policy.eval_samples, on the
        student's own continuations of held-out prompts (the gap the teacher-hacking diagnostic watches)."""
        was_training = model.training
        model.eval()
        nll = agree = kl = 0.0
        tokens = 0
        for i in progress.bar(range(0, len(self.eval), self.eval_batch_size), desc="evaluate", unit="batch"):
            rows = self.eval[i:i + self.eval_batch_size]
            batch = to_device(collate_rows([x[0] for x in rows], [x[1] for x in rows], self.pad_id), self.rt.device)
            with self.rt.autocast():
                logits = model.logits(batch["student"]).float()
                teacher_logits = self.teacher.logits(batch["student"]).float() if who == "student" else None
            mask = batch["loss_mask"]
            n = int(mask.sum())
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                                     ignore_index=-100, reduction="sum").item()
            if teacher_logits is not None:
                agree += ((logits.argmax(-1) == teacher_logits.argmax(-1)) & mask).sum().item()
                kl += forward_kl(logits, teacher_logits, mask=mask).item() * n
            tokens += n
        metrics = {"perplexity": math.exp(nll / tokens), "nll": nll / tokens}
        if who == "student":
            metrics.update(top1_agreement=agree / tokens, kl_to_teacher=kl / tokens)
            if self.sampling is not None and self.sampling.eval_samples > 0:
                metrics.update(self._kl_on_samples(model))
        model.train(was_training)
        return metrics

    def _kl_on_samples(self, model) -> Dict[str, float]:
        """KL(teacher || student) per token on the student's own continuations of the first eval_samples held-out
        prompts (the same prompts and sampling seed at every evaluation)."""
        from kdrun.tasks.causal_lm.on_policy import continued, sample

        s = self.sampling
        rows = self.eval[:s.eval_samples]
        prompts = [x[0][:x[2]] for x in rows]
        gen = sample(model, prompts, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                     eos_id=self.teacher.tokenizer.eos_token_id, pad_id=self.pad_id, seed=s.seed,
                     runtime=self.rt)
        ids, trained = zip(*(continued(p, g) for p, g in zip(prompts, gen)))
        batch = to_device(collate_rows(ids, trained, self.pad_id), self.rt.device)
        with self.rt.autocast():
            logits = model.logits(batch["student"]).float()
            teacher_logits = self.teacher.logits(batch["student"]).float()
        return {"kl_to_teacher_on_samples": forward_kl(logits, teacher_logits, mask=batch["loss_mask"]).item()}

    def eval_size(self) -> int:
        """Held-out examples one evaluation goes through (for the per-example latency metric)."""
        return len(self.eval)

    def eval_fingerprint(self) -> str:
        """SHA-256 of the held-out token ids (and, for conversations, which tokens are trained)."""
        h = hashlib.sha256()
        for ids, trained, _ in self.eval:
            h.update(ids.numpy().tobytes() + (b"" if not self.chat else b"|" + trained.numpy().tobytes()))
        return h.hexdigest()

    def model_examples(self) -> list:
        """The logged model's input example: the start of a held-out text, or a held-out prompt."""
        if self.chat:
            return [self.teacher.tokenizer.decode(self.eval[0][0][:self.eval[0][2]])]
        return [" ".join(self.data.eval_texts[0].split()[:12])]

    def describe(self) -> str:
        if self.chat:
            return (f"held-out conversations: {len(self.eval)} (loss on the completions), training conversations: "
                    f"{len(self.train)}")
        return (f"held-out blocks: {len(self.eval)} x {self.data.block_size} tokens, "
                f"training blocks: {len(self.train)}")
