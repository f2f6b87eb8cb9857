"""Chat and prompt/completion rows as training tokens (kdrun/tasks/causal_lm/task.py): the loss lands on the
assistant's turns (or the completion) only, through the student's chat template (SmolLM2's, on the tiny Llama)."""
import pytest
import torch

from support import CHATS


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_llama):
    """SmolLM2-135M's tokenizer and chat template (kdrun-tiny/llama carries them, read from the GGUF file once)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_chat_tokens_carry_loss_only_on_the_assistant_turns(smol_tokenizer):
    from kdrun.tasks.causal_lm.batches import collate_rows
    from kdrun.tasks.causal_lm.task import encode_chat

    tok = smol_tokenizer
    ids, trained = encode_chat(tok, {"messages": CHATS[1], "train_from": 0}, 256)
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == \
        "Fish live in water.<|im_end|>\nBirds live in nests.<|im_end|>\n"
    prompt_part = tok.decode([i for i, t in zip(ids, trained) if not t])
    assert "Where do fish live?" in prompt_part and "And birds?" in prompt_part and "Fish" not in prompt_part
    ids2, trained2 = encode_chat(tok, {"messages": CHATS[1], "train_from": 2}, 256)  # prompt/completion: the last turn
    assert tok.decode([i for i, t in zip(ids2, trained2) if t]) == "Birds live in nests.<|im_end|>\n"
    ids3, trained3 = encode_chat(tok, {"prompt": "Q: What do cats drink?\nA:", "completion": " Milk."}, 256)
    assert tok.decode([i for i, t in zip(ids3, trained3) if t]) == " Milk." + tok.eos_token
    assert encode_chat(tok, {"messages": CHATS[1], "train_from": 0}, 8) is None  # cut before any answer: dropped
    batch = collate_rows([torch.tensor(ids), torch.tensor(ids3)], [torch.tensor(trained), torch.tensor(trained3)],
                         tok.eos_token_id)
    assert batch["student"]["attention_mask"].sum().item() == len(ids) + len(ids3)
    assert (batch["labels"] != -100).sum().item() == batch["loss_mask"].sum().item() == sum(trained[1:]) + sum(trained3[1:])
    assert ((batch["labels"] == -100) == ~batch["loss_mask"]).all()
