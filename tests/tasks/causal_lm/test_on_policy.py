"""On-policy distillation (GKD, kdrun/tasks/causal_lm/on_policy.py): the rows the student continues are its own
samples and carry the loss, the others stay as they are, and the training's random state is untouched. On the tiny
Llama with SmolLM2's tokenizer: the mechanics of generation and masking, not quality."""
import pytest
import torch

from support import CHATS


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_llama):
    """SmolLM2-135M's tokenizer and chat template (kdrun-tiny/llama carries them, read from the GGUF file once)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama, smol_tokenizer):
    """kdrun-tiny/llama (SmolLM2's tokenizer, random weights): the mechanics of generation and masking, not quality."""
    from transformers import LlamaForCausalLM

    from kdrun.models.causal_lm import CausalLM

    return CausalLM(LlamaForCausalLM.from_pretrained(tiny_llama), smol_tokenizer)


def _chat_batch(tok, n=4):
    from kdrun.tasks.causal_lm.task import Collate, encode_chat

    rows = []
    for c in (CHATS * 2)[:n]:
        ids, trained = encode_chat(tok, {"messages": c, "train_from": 0}, 256)
        t = torch.tensor(trained)
        rows.append((torch.tensor(ids), t, int(t.nonzero()[0, 0])))
    return Collate(online=True, pad_id=tok.eos_token_id)(rows), rows


def test_on_policy_rows_are_the_students_own_samples_and_carry_the_loss(tiny_lm, smol_tokenizer):
    from kdrun.runtime import make_runtime
    from kdrun.tasks.causal_lm.on_policy import OnPolicy, sample

    tok, rt = smol_tokenizer, make_runtime("cpu", "fp32")
    batch, rows = _chat_batch(tok)
    hook = OnPolicy(fraction=0.5, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7, eos_id=tok.eos_token_id,
                    pad_id=tok.eos_token_id, runtime=rt)
    chosen = hook.rows_for(3, 0, 4)
    assert len(chosen) == 2
    rng_before = torch.get_rng_state()
    out = hook(tiny_lm, batch, 3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training's random state is untouched
    prompts = [rows[r][0][:rows[r][2]] for r in chosen]
    want = sample(tiny_lm, prompts, temperature=1.0, top_p=0.9, max_new_tokens=6, eos_id=tok.eos_token_id,
                  pad_id=tok.eos_token_id, seed=7 * 1_000_003 + 3 * 1009, runtime=rt)
    for r in range(4):
        n = int(out["length"][r])
        got_ids, got_mask = out["student"]["input_ids"][r, :n], out["loss_mask"][r, :n - 1]
        if r in chosen:
            g = want[chosen.index(r)]
            p = rows[r][2]
            assert torch.equal(got_ids, torch.cat([rows[r][0][:p], g]))  # the prompt, then the student's sample
            assert not torch.equal(got_ids, rows[r][0])  # not the data's answer
            assert got_mask.tolist() == [False] * (p - 1) + [True] * len(g)  # loss on the sample only
        else:
            assert torch.equal(got_ids, rows[r][0]) and torch.equal(got_mask, rows[r][1][1:])
    assert out["teacher"] is out["student"]  # the teacher scores the student's tokens
    logs = hook.logs()
    assert logs["generate_seconds"] > 0 and logs["generated_tokens_per_s"] > 0 and logs["on_policy_share"] == 0.5


def test_lambda_zero_leaves_the_batch_and_the_random_state_alone(tiny_lm, smol_tokenizer):
    from kdrun.runtime import make_runtime
    from kdrun.tasks.causal_lm.on_policy import OnPolicy

    tok = smol_tokenizer
    batch, _ = _chat_batch(tok)
    hook = OnPolicy(fraction=0.0, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=1, eos_id=tok.eos_token_id,
                    pad_id=tok.eos_token_id, runtime=make_runtime("cpu", "fp32"))
    state = torch.get_rng_state()
    assert hook(tiny_lm, batch, 1) is batch and torch.equal(torch.get_rng_state(), state)
    assert hook.logs()["on_policy_share"] == 0.0
