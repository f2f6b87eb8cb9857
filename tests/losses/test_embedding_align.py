"""Embedding alignment (sentence-transformers' EmbedDistillLoss): the term's known values with and without a learned
projection, and the asymmetric evaluation it adds (student queries against the teacher's passages)."""
import pytest
import torch


def test_embedding_align_known_values_with_and_without_a_projection():
    from kdrun.losses.terms import Context, EmbeddingAlign

    s = {"query_emb": torch.tensor([[1.0, 0.0]]), "passage_emb": torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])}
    t = {"query_emb": torch.tensor([[0.0, 0.0]]), "passage_emb": torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])}
    same = EmbeddingAlign(Context(task="ranking", student_hidden=2, teacher_hidden=2), "mse")
    assert same(s, t, {}).item() == pytest.approx((1 + 0 + 0 + 1 + 0 + 0) / 6)  # squared errors over 3 x 2 entries
    cos = EmbeddingAlign(Context(task="ranking", student_hidden=2, teacher_hidden=2), "cosine")
    t_cos = {"query_emb": torch.tensor([[2.0, 0.0]]), "passage_emb": torch.tensor([[[0.0, 1.0], [-1.0, -1.0]]])}
    assert cos(s, t_cos, {}).item() == pytest.approx((0 + 0 + 2) / 3)  # 1 - cos: aligned, aligned, opposite
    wide = EmbeddingAlign(Context(task="ranking", student_hidden=2, teacher_hidden=3), "mse")
    assert isinstance(wide.proj, torch.nn.Linear) and wide.proj.weight.shape == (3, 2)
    t3 = {k: torch.nn.functional.pad(v, (0, 1)) for k, v in t.items()}
    loss = wide(s, t3, {})
    loss.backward()
    assert wide.proj.weight.grad is not None and torch.isfinite(loss)


def test_the_asymmetric_evaluation_of_the_teacher_against_itself_is_its_own_evaluation(tiny_bert):
    """Student queries against teacher passages: with the teacher in the student's place and no projection, the
    scores are the teacher's own."""
    from kdrun.losses.terms import Context, EmbeddingAlign
    from kdrun.models import load_teacher
    from kdrun.runtime import make_runtime
    from kdrun.tasks.ranking import RankingTask
    from kdrun.tasks.ranking.task import score_lists
    from kdrun.data.ranking import RankingData

    teacher = load_teacher(path=tiny_bert, kind="bi_encoder", name=None, gguf_file=None, pooling="mean",
                           similarity="cos", label_index=-1, max_length=32, top_k=0)
    qs = ["what do cats drink", "where do fish live"]
    cands = [["cats drink milk", "fish live in water", "cows eat grass"], ["fish live in water", "owls hunt"]]
    data = RankingData([(qs[0], cands[0][:2])], qs, cands, [[1, 0, 0], [1, 0]], "test")
    task = RankingTask(data, teacher, None, make_runtime("cpu", "fp32"), eval_batch_size=4)
    task.align = EmbeddingAlign(Context(task="ranking", student_hidden=32, teacher_hidden=32), "mse")
    got = task.asymmetric_scores(teacher)
    want = score_lists(teacher, qs, cands, 4, task.rt)
    # (other batches, other padding: float32 rounding apart, relative)
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, want))
    assert task.eval_variant().startswith("asymmetric:") and RankingTask(data, teacher, None, task.rt, 4).eval_variant() == ""
