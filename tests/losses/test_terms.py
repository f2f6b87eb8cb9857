"""The loss as weighted terms (kdrun/losses/terms.py, specs.py): the total and every term, settings passed and the
ones a term does not take refused, what a term asks the models for, a user's own term by _target_
(tests/plugins/my_terms.py), and losses logged by older kdruns converted for reruns."""
from pathlib import Path

import math

import pytest
import torch

from kdrun.losses import Context, WeightedLoss
from kdrun.losses.functional import listwise_kl

RANKING = Context(task="ranking")
PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def test_weighted_loss_returns_total_and_every_term():
    s = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[0.9, 0.4], [0.5, 0.0]])
    out = WeightedLoss([("margin_mse", 0.5)], RANKING)({"scores": s}, {"scores": t}, {})
    assert set(out) == {"loss", "margin_mse"}
    assert out["margin_mse"].item() == pytest.approx(4.25)
    assert out["loss"].item() == pytest.approx(2.125)
    with pytest.raises(KeyError, match="known"):
        WeightedLoss([("nope", 1.0)], RANKING)


def test_weighted_loss_passes_settings_and_refuses_those_a_term_does_not_take():
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    terms = [("listwise_kl", 1.0, {"temperature": 2.0}), ("margin_mse", 0.1)]
    out = WeightedLoss(terms, RANKING)({"scores": s}, {"scores": t}, {})
    assert out["listwise_kl"].item() == pytest.approx(listwise_kl(s, t, temperature=2.0).item())
    assert out["loss"].item() == pytest.approx(out["listwise_kl"].item() + 0.1 * out["margin_mse"].item())
    with pytest.raises(ValueError, match=r"margin_mse takes no \['temperature'\]; its settings: \['weight', 'teacher'\]"):
        WeightedLoss([("margin_mse", 1.0, {"temperature": 2.0})], RANKING)  # once silently dropped


def test_cross_entropy_term_reads_labels():
    loss = WeightedLoss([("ce", 1.0)], Context(task="classification"))
    out = loss({"logits": torch.tensor([[math.log(3.0), 0.0]])}, {}, {"labels": torch.tensor([0])})
    assert out["ce"].item() == pytest.approx(-math.log(0.75), rel=1e-6)


# ---- a user's own term, by _target_ (tests/plugins/my_terms.py) ----


def _parse(terms, task="ranking"):
    from kdrun.losses.specs import parse

    return parse(terms, task, ["teacher"], online=False)


def test_a_users_function_and_module_become_terms_with_their_settings_checked(monkeypatch):
    from kdrun.errors import ConfigError

    monkeypatch.syspath_prepend(str(PLUGINS))
    terms = _parse({"mine": {"_target_": "my_terms.scaled_margin_mse", "scale": 2.0, "weight": 0.5},
                    "gap": {"_target_": "my_terms.ScoreGap", "margin": 0.5}})
    assert terms["mine"].as_config() == {"_target_": "my_terms.scaled_margin_mse", "weight": 0.5, "scale": 2.0}
    loss = WeightedLoss(terms, RANKING)
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    out = loss({"scores": s}, {"scores": t}, {})
    assert out["mine"].item() == pytest.approx(0.0) and out["gap"].item() == pytest.approx(1.5 ** 2)
    assert [n for n, _ in loss.named_parameters()] == ["terms.1.module.margin"]  # trains with the student
    with pytest.raises(ConfigError, match=r"loss.terms.mine: my_terms.scaled_margin_mse takes no 'scal'; its "
                                          r"settings: \['weight', 'teacher', 'scale'\]"):
        _parse({"mine": {"_target_": "my_terms.scaled_margin_mse", "scal": 2.0}})
    with pytest.raises(ConfigError, match=r"is called as fn\(student_out, teacher_out, batch"):
        _parse({"mine": {"_target_": "my_terms.two_arguments"}})
    with pytest.raises(ConfigError, match="cannot import it"):
        _parse({"mine": {"_target_": "my_terms.nope"}})
    with pytest.raises(ConfigError, match="loss.terms.mine is a ranking loss, but data.task=classification"):
        _parse({"mine": {"_target_": "my_terms.scaled_margin_mse"}}, task="classification")  # its `tasks`


def test_a_loss_logged_before_terms_were_keyed_by_name_converts_for_reruns():
    from kdrun.losses.specs import from_list

    old = [{"name": "kd_kl", "weight": 0.5, "temperature": 2.0, "alpha": 0.1, "beta": 0.5, "t_start": 0.4,
            "t_end": 1.0, "taid_alpha": 5e-4, "taid_beta": 0.99, "layer_map": None, "teacher": None},
           {"name": "ce", "weight": 0.5, "temperature": 1.0, "alpha": 0.1, "beta": 0.5, "layer_map": None}]
    assert from_list(old) == {"kd_kl": {"weight": 0.5, "temperature": 2.0, "teacher": None},
                              "ce": {"weight": 0.5}}  # what the old run used: the settings each term takes
    assert set(_parse(from_list(old), task="classification")) == {"kd_kl", "ce"}
