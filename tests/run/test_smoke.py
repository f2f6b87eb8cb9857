"""The smoke presets as a user types them (README: "check your install, or your data, in seconds"): each family's
`kdrun experiment=smoke*` trains its tiny models on the shipped data, evaluates before and after, saves and logs the
student, and lands FINISHED in MLflow; a user's own data swaps in with data=... alone."""
import json

import pytest

from support import kdrun, ok, only_run

PRIMARY = {"smoke": "mrr_at_10", "smoke_classification": "accuracy", "smoke_causal_lm": "perplexity"}


@pytest.mark.parametrize("preset", sorted(PRIMARY))
def test_every_familys_smoke_preset_runs_whole_as_typed(tmp_path, preset):
    r = ok(kdrun([f"experiment={preset}", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path))
    assert "student before" in r.stdout and PRIMARY[preset] in r.stdout
    c, run = only_run(tmp_path, "smoke")
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "4"
    assert run.data.tags["kdrun.choice.experiment"] == preset
    assert run.data.params["teacher.name"].startswith("kdrun-tiny/")  # no hub, no download
    assert [m.step for m in c.get_metric_history(run.info.run_id, f"eval/student/{PRIMARY[preset]}")] == [0, 4]
    assert (tmp_path / "out" / "student" / "config.json").is_file() and run.outputs.model_outputs  # saved and logged


def test_the_classification_smoke_preset_takes_your_own_file(tmp_path):
    rows = [{"text": f"{w} number {i} is here", "label": w} for i in range(40) for w in ("apple", "engine")]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ok(kdrun(["experiment=smoke_classification", "data=text_classification", f"data.path={tmp_path / 'mine.jsonl'}",
              "tracking.log_student=false", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path))
    _, run = only_run(tmp_path, "smoke")
    assert run.info.status == "FINISHED" and run.data.params["data/classes"] == "2"
