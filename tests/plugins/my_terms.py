"""A user's own loss terms, outside kdrun: plugged in by `+loss.terms.NAME._target_=my_terms.<name>` (this folder on
PYTHONPATH), with no change to kdrun."""
import torch


def scaled_margin_mse(student_out, teacher_out, batch, scale: float = 1.0):
    """Margin-MSE on the teacher's margins times `scale` (a term kdrun does not have)."""
    s, t = student_out["scores"].float(), teacher_out["scores"].float()
    return ((s[:, :1] - s[:, 1:]) - scale * (t[:, :1] - t[:, 1:])).pow(2).mean()


scaled_margin_mse.tasks = ("ranking",)  # what the term fits: checked like a kdrun term's


class ScoreGap(torch.nn.Module):
    """A module term with a learned offset: (s+ - s- - margin)^2, the margin a parameter."""

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = torch.nn.Parameter(torch.tensor(float(margin)))

    def forward(self, student_out, teacher_out, batch):
        s = student_out["scores"].float()
        return (s[:, :1] - s[:, 1:] - self.margin).pow(2).mean()


def two_arguments(student_out, teacher_out):
    return student_out["scores"].sum()
