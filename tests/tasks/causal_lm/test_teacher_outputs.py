"""A causal-LM teacher's outputs for the cache (kdrun/tasks/causal_lm): top-k logits, their ids and the
log-normaliser, which give the online top-k teacher's log-probs."""
import torch

from kdrun.runtime import make_runtime
from support import f32_close


def test_causal_lm_cache_stores_topk_logits_and_normaliser_that_give_the_online_topk_logprobs(tmp_path):
    """A tiny random Llama (no download): the cached top-k logits minus the log-normaliser equal the log-probs the
    online top-k teacher gives a batch of another size (to float32 rounding: other batch shapes, other kernels)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdrun.models.causal_lm import CausalLM
    from kdrun.tasks.causal_lm import CausalLMTask

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    teacher = CausalLM(model, tokenizer=None, top_k=5)
    task = CausalLMTask.__new__(CausalLMTask)
    task.train_blocks, task.eval_batch_size, task.rt = torch.randint(0, 97, (6, 12)), 4, make_runtime("cpu", "fp32")
    task.train, task.pad_id = CausalLMTask._blocks(task.train_blocks), 0
    outputs = task.teacher_outputs(teacher)
    assert set(outputs) == {"topk_logits", "topk_ids", "log_normaliser"}
    assert outputs["topk_logits"].shape == (6, 11, 5) and outputs["log_normaliser"].shape == (6, 11)
    examples = task.attach(outputs)
    with torch.inference_mode():
        online = teacher({"input_ids": task.train_blocks[:3]})
        full = torch.log_softmax(model(task.train_blocks[:3]).logits[:, :-1].float(), -1)
    for i in range(3):
        cached, ids = examples[i][3]["topk_logprobs"], examples[i][3]["topk_ids"].long()
        assert f32_close(cached, online["topk_logprobs"][i])
        # the cached ids name the top-k tokens (compared by their log-probs: a near tie may order ids apart)
        assert f32_close(full[i].gather(-1, ids), cached) and f32_close(full[i].topk(5, -1).values, cached)
