"""A sweep's summary (kdrun/summary.py), from runs made by hand: results averaged over seeds per student and loss with
the teacher first, jobs in their numbers' order, the Pareto front and its caveats, loss panels. The summary a real
sweep's parent holds, and `kdrun-report` over it: tests/run/test_sweeps.py."""
import pytest


def _fake_run(seed, student, loss, mrr, ms, status="FINISHED"):
    from types import SimpleNamespace as NS

    metrics = {"eval/student/mrr_at_10": mrr, "eval/teacher/mrr_at_10": 0.6, "eval/student/ms_per_example": ms,
               "eval/teacher/ms_per_example": 10.0, "model/student_params": 20.0, "model/teacher_params": 40.0,
               "model/student_flops_per_token": 1.0, "model/teacher_flops_per_token": 3.0}
    return NS(info=NS(status=status, run_name=f"{student} {loss} {seed}", run_id=f"{student}{loss}{seed}"),
              data=NS(metrics=metrics, params={"train.seed": str(seed), "student.arch": student, "loss.terms": loss},
                      tags={"kdrun.choice.student": student, "kdrun.choice.loss": loss, "kdrun.choice.data": "x"}))


def test_results_average_over_seeds_per_student_and_loss_with_the_teacher_first():
    from kdrun import summary

    runs = [_fake_run(s, st, lo, mrr, ms) for st, lo, base in (("bi", "ce", 0.3), ("colbert", "margin_mse", 0.5))
            for s, mrr, ms in ((1, base, 4.0), (2, base + 0.1, 6.0), (3, base + 0.2, 5.0))]
    runs.append(_fake_run(4, "bi", "ce", 0.99, 1.0, status="FAILED"))  # failed runs are left out
    assert summary.factors(runs[:6]) == ["student", "loss"]  # the seed and the groups' own params are not factors
    runs[0].data.params["data/extraction_cache_hit"] = "0"  # what the data config produced (the first job built a
    for r in runs[1:6]:                                       # cache the others read) splits no group
        r.data.params["data/extraction_cache_hit"] = "1"
    assert summary.factors(runs[:6]) == ["student", "loss"]
    for i, r in enumerate(runs[:6]):  # bookkeeping: a resumed sweep's jobs differ in resume=, the store in tracking.*
        r.data.params.update({"resume": "auto" if i % 2 else "None", "tracking.uri": f"sqlite:///{i}.db",
                              "tracking.experiment": f"e{i % 2}", "teacher.cache_dir": f"/c{i}"})
    assert summary.factors(runs[:6]) == ["student", "loss"]
    csv_columns, csv_rows, md_columns, md_rows = summary.results(runs)
    assert csv_columns[:6] == ["model", "student", "loss", "seeds", "mrr_at_10_mean", "mrr_at_10_std"]
    assert csv_rows[0][:6] == ["teacher", "", "", "3", "0.6", "0"]
    assert [r[:3] for r in csv_rows[1:]] == [["student", "bi", "ce", "3"][:3], ["student", "colbert", "margin_mse"]]
    bi = dict(zip(csv_columns, csv_rows[1]))
    assert float(bi["mrr_at_10_mean"]) == pytest.approx(0.4) and float(bi["mrr_at_10_std"]) == pytest.approx(0.1)
    assert float(bi["latency_vs_teacher_mean"]) == pytest.approx(0.5) and bi["seeds"] == "3"
    assert float(bi["flops_vs_teacher_mean"]) == pytest.approx(1 / 3) and float(bi["params_vs_teacher_mean"]) == 0.5
    assert md_rows[1][4] == "0.4000 ± 0.1000" and md_columns[-3:] == [
        "latency per query vs teacher", "FLOPs per token vs teacher", "params vs teacher"]


def test_sweep_jobs_are_ordered_by_job_number_not_by_start_time():
    """Parallel jobs start in no fixed order: tables list a sweep's jobs by number, whatever their start times."""
    from types import SimpleNamespace as NS

    from kdrun import summary
    from kdrun import tags as kdtags

    def run(num, start, parent="p1", name=None):
        tags = {"mlflow.parentRunId": parent} if parent else {}
        if num is not None and name is None:
            tags[kdtags.JOB_NUM] = str(num)
        return NS(info=NS(start_time=start, run_id=f"id{num}{start}", run_name=name or f"#{num} x", status="FINISHED"),
                  data=NS(tags=tags, metrics={}, params={}))

    jobs = [run(3, 100), run(1, 101), run(0, 103), run(2, 102)]  # job 3 happened to start first
    assert [summary.job_num(r) for r in summary.run_order(jobs)] == [0, 1, 2, 3]
    old = run(None, 50, parent="p0", name="#1 lr=2")  # logged before the tag: its name says "#1"
    older = run(None, 60, parent="p0", name="#0 lr=1")
    single = run(None, 10, parent=None, name="kdrun-1129")
    ordered = summary.run_order([*jobs, old, single, older])
    assert [r.info.run_name.split(" ")[0] for r in ordered] == ["kdrun-1129", "#0", "#1", "#0", "#1", "#2", "#3"]


def test_a_cost_panel_without_a_trade_off_says_so_instead_of_drawing_a_front():
    from kdrun.summary import front_caveat

    assert "every student has 15.6M parameters" in front_caveat([15.6, 15.6, 15.6], "model/student_params", 0.0)
    assert "15.62-15.66M" in front_caveat([15.62, 15.66], "model/student_params", 0.0)  # a projection more
    assert front_caveat([15.6, 22.7], "model/student_params", 0.0) is None
    # 4.0 vs 4.2 ms: 5% apart, while one student timed twice varies by 10%: noise
    assert "within measurement noise" in front_caveat([4.0, 4.2], "eval/student/ms_per_example", 0.10)
    assert front_caveat([4.0, 8.0], "eval/student/ms_per_example", 0.10) is None


def test_loss_terms_get_panels_of_their_own_and_short_runs_log_often():
    from types import SimpleNamespace as NS

    from kdrun.pipeline import log_interval
    from kdrun.summary import loss_panels

    def run(terms, metrics):
        params = {f"loss.terms.{name}.weight": str(w) for name, w in terms.items()}
        return NS(data=NS(params=params, metrics={k: 1.0 for k in metrics}))

    kd = run({"kd_kl": 0.5, "ce": 0.5}, ["train/loss", "train/kd_kl", "train/ce"])
    mse = run({"margin_mse": 1.0}, ["train/loss", "train/margin_mse"])
    old = NS(data=NS(params={"loss.terms": '[{"name": "kd_kl", "weight": 0.5}, {"name": "ce", "weight": 0.5}]'},
                     metrics={}))  # logged before terms were keyed by name
    from kdrun.summary import term_names

    assert term_names(old) == ["kd_kl", "ce"] and term_names(kd) == ["kd_kl", "ce"]
    assert loss_panels([mse]) == ["train/loss"]  # one term of weight 1: it is the total
    assert loss_panels([mse, kd]) == ["train/loss", "train/kd_kl", "train/ce"]
    assert [log_interval(n) for n in (3, 20, 87, 249, 250, 10_000)] == [1, 1, 3, 9, 10, 10]


def test_pareto_front():
    from kdrun.summary import pareto

    pts = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.4), (3.0, 0.6), (0.5, 0.1)]
    assert pareto(pts, "max") == [0, 1, 4]
    assert pareto([(1.0, 10.0), (2.0, 5.0), (3.0, 7.0)], "min") == [0, 1]
