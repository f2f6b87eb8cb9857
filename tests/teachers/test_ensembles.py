"""Several teachers (kdrun/models/ensemble.py): their outputs averaged with their weights, each one's own kept for
a loss term that names it."""
import torch

from kdrun.losses import WeightedLoss, Context
from kdrun.models import load_teacher
from kdrun.models.ensemble import Ensemble, combine
from support import PASSAGES, QUERIES, TEACHER, f32_close


def test_several_teachers_average_with_weights_and_a_term_can_name_one(teacher, tiny_bert):
    second = load_teacher(path=tiny_bert, kind="bi_encoder", **{**TEACHER, "pooling": "cls", "similarity": "dot"})
    ens = Ensemble({"teacher": teacher, "cls": second}, {"teacher": 1.0, "cls": 3.0})
    out = ens(ens.featurize(QUERIES[:2], PASSAGES[:2]))
    a = teacher(teacher.featurize(QUERIES[:2], PASSAGES[:2]))["scores"]
    b = second(second.featurize(QUERIES[:2], PASSAGES[:2]))["scores"]
    assert f32_close(out["scores"], (a + 3 * b) / 4) and torch.equal(out["scores@cls"], b)
    lists = ens.score_lists(QUERIES[:2], PASSAGES[:2], 4, torch.device("cpu"))
    assert f32_close(torch.stack(lists), (a + 3 * b) / 4)  # other batch shapes: equal to float32 rounding
    student = {"scores": torch.zeros(2, 3)}
    both = WeightedLoss([("margin_mse", 1.0, {"teacher": None}), ("pointwise_mse", 1.0, {"teacher": "cls"})],
                        Context(task="ranking"))(student, out, {})
    from kdrun.losses import functional as F

    assert torch.allclose(both["margin_mse"], F.margin_mse(student["scores"], out["scores"]))
    assert torch.allclose(both["pointwise_mse"], F.pointwise_mse(student["scores"], b))
    assert combine({"teacher": {"logits": torch.ones(2, 4)}}, {"teacher": 2.0})["logits"].eq(1).all()
