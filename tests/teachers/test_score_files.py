"""Score files (kdrun/data/scores_file.py): the teacher's scores of every training triple written in the Margin-MSE
authors' format and joined back by ids, exactly; missing ids counted and refused above a limit; a malformed line or a
missing file named with the fix."""
import pytest
import torch

from kdrun.data import scores_file
from kdrun.data.ranking import text_id
from kdrun.errors import DataError
from support import PASSAGES, QUERIES, ranking_data, ranking_task


def test_score_file_round_trip_is_exact_and_joins_by_ids(teacher, tmp_path):
    data = ranking_data()
    scores = ranking_task(teacher).teacher_outputs(teacher)["scores"]
    f = tmp_path / "scores.tsv"
    lines = scores_file.write(str(f), data, scores)
    assert lines == 6 * 2  # one line per (query, positive, negative)
    first = f.read_text().splitlines()[0].split("\t")
    assert first[2:] == [text_id(QUERIES[0]), text_id(PASSAGES[0][0]), text_id(PASSAGES[0][1])]
    before = list(data.train)
    joined, missing = scores_file.join(data, str(f), 0.0)
    assert missing == 0 and data.train == before and torch.equal(joined, scores)


def test_score_file_missing_ids_are_counted_and_fail_above_the_limit(teacher, tmp_path):
    data = ranking_data()
    f = tmp_path / "scores.tsv"
    scores_file.write(str(f), ranking_data(data.train[:4]), torch.rand(4, 3))
    with pytest.raises(DataError, match=r"2 of 6 training examples \(33.3%\).*max_missing_fraction=0.2"):
        scores_file.join(data, str(f), 0.2)
    _, missing = scores_file.join(data, str(f), 0.5)
    assert missing == 2 and len(data.train) == 4


@pytest.mark.parametrize("line,match", [
    ("1.0\t2.0\tq1\tp1\n", r"scores.tsv:2: expected 5 tab-separated columns"),
    ("high\t2.0\tq1\tp1\tp2\n", r"scores.tsv:2: the first two columns must be numbers"),
    ("nan\t2.0\tq1\tp1\tp2\n", r"scores.tsv:2: scores must be finite"),
])
def test_malformed_score_file_lines_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "scores.tsv"
    f.write_text("1.5\t0.5\tq0\tp0\tp1\n" + line)
    with pytest.raises(DataError, match=match):
        scores_file.join(ranking_data(), str(f), 0.0)


def test_missing_score_file_says_how_to_write_one(tmp_path):
    with pytest.raises(DataError, match="no such file.*kdrun mode=score"):
        scores_file.join(ranking_data(), str(tmp_path / "nope.tsv"), 0.0)
