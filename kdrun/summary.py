"""Compare runs: MLflow runs (a sweep's children, or an experiment) -> a table of what varied and what came out
(CSV and Markdown), a quality-vs-cost plot with the Pareto front marked, and the loss curves (PNG).

Used by the sweep callback (kdrun/sweep.py) when a sweep ends, and by `kdrun-report` (kdrun/report.py) for any
experiment or parent run. Reads MLflow through its client only; no torch.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from kdrun import tags


# params that differ between jobs without being a choice of the user
# (data/*: what the data config produced; resume, tracking.*: where a run goes and how it was restarted)
_NOISE = ("output_dir", "tracking.", "scores_out", "data/", "resume", "teacher.cache_dir", "teacher.finetune.cache_dir")
_COSTS = (("model/student_params", "student parameters (millions)", 1e-6),
          ("eval/student/ms_per_example", "student eval latency (ms per held-out example)", 1.0))


def runs_of(client, *, parent_run_id: Optional[str] = None, experiment: Optional[str] = None) -> list:
    """A parent run's children, or every run of an experiment except sweep parents, in `run_order`."""
    if parent_run_id:
        parent = client.get_run(parent_run_id)
        runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=5000)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"kdrun-report: no MLflow experiment named '{experiment}' in {client.tracking_uri}")
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=5000) if tags.SWEEP_PARENT not in r.data.tags]
    return run_order(runs)


def job_num(run) -> Optional[int]:
    """A sweep job's number: its tag, or the "#N" its name starts with (runs logged before the tag); else None."""
    tag = run.data.tags.get(tags.JOB_NUM)
    if tag is not None and tag.isdigit():
        return int(tag)
    name = run.info.run_name or ""
    head = name[1:].split(" ", 1)[0] if name.startswith("#") else ""
    return int(head) if head.isdigit() else None


def run_order(runs: Sequence) -> list:
    """Each sweep's jobs together and in job-number order (parallel jobs start in no fixed order, so start times
    would shuffle them); sweeps, and runs outside sweeps, by when they began; the run id breaks remaining ties."""
    first: Dict[str, int] = {}  # a sweep's earliest start
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent:
            first[parent] = min(first.get(parent, r.info.start_time or 0), r.info.start_time or 0)

    def key(r):
        parent, num = r.data.tags.get("mlflow.parentRunId"), job_num(r)
        began = first[parent] if parent else (r.info.start_time or 0)
        return (began, parent or "", num if num is not None else -1, r.info.start_time or 0, r.info.run_id)

    return sorted(runs, key=key)


LOSS = "loss.terms"  # one column for the loss: its terms' names ("kd_kl+ce"), however many settings they have


def term_names(run) -> List[str]:
    """The run's loss terms by name: from its loss.terms.NAME.* params (or the one JSON list of runs logged before
    terms were keyed by name)."""
    import json

    old = run.data.params.get(LOSS)
    if old and old.startswith("["):
        try:
            return [t["name"] for t in json.loads(old)]
        except (ValueError, TypeError, KeyError):
            return []
    return list(dict.fromkeys(k.split(".")[2] for k in run.data.params if k.startswith(LOSS + ".")))


def param(run, key: str) -> str:
    """A run's value of a param, or of the loss column (its terms' names)."""
    return "+".join(term_names(run)) if key == LOSS else run.data.params.get(key, "")


def varied_params(runs: Sequence) -> List[str]:
    """The params that differ between runs: the loss once (when the terms differ), then every term setting that
    all runs have and that differs."""
    keys = sorted({k for r in runs for k in r.data.params if not k.startswith(LOSS)})
    varied = [k for k in keys if not k.startswith(_NOISE) and len({r.data.params.get(k) for r in runs}) > 1]
    if len({param(r, LOSS) for r in runs}) > 1:
        varied.append(LOSS)
    settings = sorted({k for r in runs for k in r.data.params if k.startswith(LOSS + ".")})
    return varied + [k for k in settings if all(k in r.data.params for r in runs)
                     and len({r.data.params[k] for r in runs}) > 1]


def primary(runs: Sequence) -> Tuple[str, str]:
    """(metric key, "max"|"min") of the runs' task (the first run's kdrun.task tag)."""
    from kdrun import tasks

    task = next((r.data.tags.get(tags.TASK) for r in runs if r.data.tags.get(tags.TASK)), tasks.names()[0])
    fam = tasks.family(task)
    return f"eval/student/{fam.primary}", fam.direction


def starting_values(client, runs: Sequence) -> Dict[str, Dict[str, float]]:
    """{run id: {eval/student/<metric>: its value before training (step 0)}}: what the student started from."""
    out: Dict[str, Dict[str, float]] = {}
    for r in runs:
        mine = out.setdefault(r.info.run_id, {})
        for key in r.data.metrics:
            if key.startswith("eval/student/") and key != "eval/student/ms_per_example":
                first = [m.value for m in client.get_metric_history(r.info.run_id, key) if m.step == 0]
                if first:
                    mine[key] = first[-1]
    return out


def table(runs: Sequence, before: Optional[Dict[str, Dict[str, float]]] = None) -> Tuple[List[str], List[List[str]]]:
    """Columns: run, status, the varied params, the student's final held-out metrics (each after its value before
    training, `before/eval/student/...`, when `before` is given), the teacher's primary metric, size, latency and
    throughput, run id."""
    before = before or {}
    params = varied_params(runs)
    metric_keys = sorted({k for r in runs for k in r.data.metrics if k.startswith("eval/student/")})
    key, _ = primary(runs)
    extra = [key.replace("student", "teacher"), "model/student_params", "train/samples_per_s"]
    starts = {k for b in before.values() for k in b}
    metric_cols = []
    for k in metric_keys:
        metric_cols += ([f"before/{k}"] if k in starts else []) + [k]
    metric_cols += [k for k in extra if k not in metric_keys]
    columns = ["run_name", "status", *params, *metric_cols, "run_id"]
    rows = []
    for r in runs:
        metrics = {**r.data.metrics, **{f"before/{k}": v for k, v in before.get(r.info.run_id, {}).items()}}
        values = {"run_name": r.info.run_name, "status": r.info.status, "run_id": r.info.run_id,
                  **{p: param(r, p) for p in params},
                  **{k: f"{metrics[k]:.6g}" for k in metric_cols if k in metrics}}
        rows.append([values.get(c, "") for c in columns])
    return columns, rows


def summary_markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """summary.md, for reading: metrics rounded, each student metric as "before → after", parameters in millions,
    long params shortened, no run ids (summary.csv keeps every value whole)."""
    shown, cells = [], []
    for i, c in enumerate(columns):
        if c == "run_id" or c.startswith("before/"):
            continue
        before_i = columns.index(f"before/{c}") if f"before/{c}" in columns else None
        name = {"run_name": "run", "model/student_params": "student params",
                "train/samples_per_s": "samples/s"}.get(c, c.replace("eval/", "").replace("/", " "))
        shown.append(name + (" (before → after)" if before_i is not None else ""))
        cells.append((i, c, before_i))
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        out = []
        for i, c, before_i in cells:
            value = _readable(c, row[i])
            if before_i is not None and row[before_i]:
                value = f"{_readable(c, row[before_i])} → {value}"
            out.append(value)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _readable(column: str, text: str) -> str:
    """A cell of summary.md: params as "15.6M", latencies and throughput with 1-2 decimals, metrics with 4."""
    try:
        value = float(text)
    except ValueError:
        return text if column in ("run_name", "status") else short(column, text)
    if column.endswith("_params"):
        return f"{value / 1e6:.1f}M"
    if column.endswith("ms_per_example"):
        return f"{value:.2f}"
    if column.endswith("samples_per_s"):
        return f"{value:.1f}"
    if column.startswith(("eval/", "before/")):
        return f"{value:.4f}"
    return short(column, text)


SEED_KEY = "train.seed"  # what a reproduction sweep repeats; results average over it


def factors(runs: Sequence) -> List[str]:
    """What tells the groups of a sweep apart, the seed left out: config groups whose choice varies ("student",
    "loss"), then varied params outside those groups ("optimizer.lr")."""
    order = ("teacher", "student", "loss", "data", "hardware", "optimizer", "experiment")
    groups = sorted({k[len(tags.CHOICE):] for r in runs for k in r.data.tags if k.startswith(tags.CHOICE)},
                    key=lambda g: (order.index(g) if g in order else len(order), g))
    groups = [g for g in groups if len({r.data.tags.get(tags.CHOICE + g) for r in runs}) > 1]
    params = [p for p in varied_params(runs) if p != SEED_KEY and not p.startswith(tuple(f"{g}." for g in groups))]
    return groups + params


def _factor(run, key: str) -> str:
    """A run's value of a factor: its choice of that config group (a tag), else the param."""
    choice = run.data.tags.get(tags.CHOICE + key)
    return choice if choice is not None else short(key, param(run, key))


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def results(runs: Sequence, before: Optional[Dict[str, Dict[str, float]]] = None
            ) -> Tuple[List[str], List[List[str]], List[str], List[List[str]]]:
    """Mean and standard deviation over seeds (train.seed) of the student's held-out metrics per group (see
    `factors`), the teacher's own figures as the first row, and each group's cost relative to the teacher:
    evaluation latency per held-out query, and parameters. With `before` (see `starting_values`), each metric's
    mean before training too. Returns CSV (columns, rows: means and stds apart, `<metric>_before_mean`) and Markdown
    (columns, rows: "before → mean ± std")."""
    before = before or {}
    done = [r for r in runs if r.info.status == "FINISHED"]
    keys = factors(done)
    metrics = sorted({k.split("/")[-1] for r in done for k in r.data.metrics
                      if k.startswith("eval/student/") and k != "eval/student/ms_per_example"
                      and f"eval/teacher/{k.split('/')[-1]}" in r.data.metrics})
    costs = ("latency_vs_teacher", "flops_vs_teacher", "params_vs_teacher")
    groups: Dict[tuple, list] = {}
    for r in done:
        groups.setdefault(tuple(_factor(r, k) for k in keys), []).append(r)
    stats = [*metrics, *costs]
    has_before = any(f"eval/student/{m}" in b for b in before.values() for m in metrics)
    csv_columns = ["model", *keys, "seeds", *(f"{m}_{x}" for m in stats for x in ("mean", "std")),
                   *([f"{m}_before_mean" for m in metrics] if has_before else [])]
    md_columns = ["model", *keys, "seeds", *(f"{m} (before → after)" if has_before else m for m in metrics),
                  "latency per query vs teacher", "FLOPs per token vs teacher", "params vs teacher"]
    csv_rows, md_rows = [], []

    def values(members: list, who: str, stat: str) -> List[float]:
        if stat == "latency_vs_teacher":
            num, den = f"eval/{who}/ms_per_example", "eval/teacher/ms_per_example"
        elif stat == "params_vs_teacher":
            num, den = f"model/{who}_params", "model/teacher_params"
        elif stat == "flops_vs_teacher":
            num, den = f"model/{who}_flops_per_token", "model/teacher_flops_per_token"
        else:
            return [r.data.metrics[f"eval/{who}/{stat}"] for r in members if f"eval/{who}/{stat}" in r.data.metrics]
        return [r.data.metrics[num] / r.data.metrics[den] for r in members
                if num in r.data.metrics and r.data.metrics.get(den)]

    def add(who: str, label: tuple, members: list) -> None:
        seeds = str(len({r.data.params.get(SEED_KEY) for r in members}))
        csv_row, md_row = [who, *label, seeds], [who, *label, seeds]
        for stat in stats:
            got = values(members, who, stat)
            mean, std = _mean_std(got) if got else (float("nan"), float("nan"))
            csv_row += [f"{mean:.6g}", f"{std:.6g}"]
            digits = 3 if stat in costs else 4
            start = [before[r.info.run_id][f"eval/{who}/{stat}"] for r in members
                     if f"eval/{who}/{stat}" in before.get(r.info.run_id, {})]
            md_row.append(("" if not start else f"{sum(start) / len(start):.{digits}f} → ") +
                          ("-" if math.isnan(mean) else f"{mean:.{digits}f}" +
                           ("" if math.isnan(std) else f" ± {std:.{digits}f}")))
        if has_before:
            for m in metrics:
                start = [before[r.info.run_id][f"eval/{who}/{m}"] for r in members
                         if f"eval/{who}/{m}" in before.get(r.info.run_id, {})]
                csv_row.append(f"{sum(start) / len(start):.6g}" if start else "")
        csv_rows.append(csv_row)
        md_rows.append(md_row)

    if any("eval/teacher/ms_per_example" in r.data.metrics for r in done):
        add("teacher", ("",) * len(keys), done)
    for label, members in groups.items():
        add("student", label, members)
    return csv_columns, csv_rows, md_columns, md_rows


def results_markdown(columns, md_rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in md_rows]) + "\n"


def to_csv(columns, rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def pareto(points: Sequence[Tuple[float, float]], direction: str) -> List[int]:
    """Indices of the points no other point beats: lower cost (x) and better quality (y, max or min)."""
    sign = 1.0 if direction == "max" else -1.0
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and sign * y2 >= sign * y) and (x2 < x or sign * y2 > sign * y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def short(key: str, value) -> str:
    """A param value for a legend or the Markdown table, long values cut."""
    text = "" if value is None else str(value)
    return text if len(text) <= 32 else text[:29] + "..."


def _label(run, params: Sequence[str]) -> str:
    text = ", ".join(f"{'loss' if p == LOSS else p.split('.')[-1]}={short(p, param(run, p))}"
                     for p in params)
    return text or run.info.run_name


def latency_noise(client, runs: Sequence) -> float:
    """Measurement noise of eval latency: the median, over runs, of the relative spread (std / mean) of a run's own
    `eval/student/ms_per_example` across its evaluations (the same model timed again), 0 when no run has two."""
    spreads = []
    for r in runs:
        values = [m.value for m in client.get_metric_history(r.info.run_id, "eval/student/ms_per_example")]
        if len(values) > 1 and sum(values) > 0:
            mean, std = _mean_std(values)
            spreads.append(std / mean)
    spreads.sort()
    return spreads[len(spreads) // 2] if spreads else 0.0


def front_caveat(xs: Sequence[float], cost_key: str, noise: float) -> Optional[str]:
    """Why a cost panel shows no Pareto front, or None: every student costs the same, or the latency differences
    are within measurement noise (under twice the typical spread between evaluations of one student)."""
    if len(xs) < 2:
        return None
    lo, hi = min(xs), max(xs)
    if hi - lo <= 0.01 * max(abs(hi), 1e-12):  # within 1%: a new head or projection, not another size
        size = f"{lo:.1f}M" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.2f}-{hi:.2f}M"
        what = f"{size} parameters" if cost_key == "model/student_params" else f"{hi:.2f} ms per example"
        return f"every student has {what} (within 1%): no trade-off, no front"
    if cost_key.endswith("ms_per_example") and (hi - lo) / ((hi + lo) / 2) < 2 * noise:
        return (f"latencies differ by {100 * (hi - lo) / ((hi + lo) / 2):.0f}%, within measurement noise "
                f"(±{100 * noise:.0f}% between evaluations of one student): no front")
    return None


def plot_pareto(runs: Sequence, path: Path, before: Optional[Dict[str, Dict[str, float]]] = None,
                noise: float = 0.0) -> Optional[Path]:
    """Quality vs student size and vs eval latency, one point per run, the Pareto front joined and ringed; each
    student's quality before training drawn as a hollow point with a line to where it ended (a student that got
    worse shows as a line going the wrong way). A panel whose costs are all equal, or whose latency differences are
    within measurement noise, says so instead of drawing a front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = before or {}
    key, direction = primary(runs)
    params = varied_params(runs)
    usable = [r for r in runs if key in r.data.metrics]
    if not usable:
        return None
    fig, axes = plt.subplots(1, len(_COSTS), figsize=(6.5 * len(_COSTS), 4.8))
    colours = _colours(plt, usable)
    for ax, (cost_key, cost_label, scale) in zip(axes, _COSTS):
        rs = [r for r in usable if cost_key in r.data.metrics]
        pts = [(r.data.metrics[cost_key] * scale, r.data.metrics[key]) for r in rs]
        for (x, y), r in zip(pts, rs):
            colour = colours[r.info.run_id]
            ax.scatter([x], [y], s=40, color=colour, label=_label(r, params), zorder=3)
            start = before.get(r.info.run_id, {}).get(key)
            if start is not None:
                ax.plot([x, x], [start, y], color=colour, lw=1, alpha=0.6)
                ax.scatter([x], [start], s=40, facecolors="none", edgecolors=[colour], zorder=3)
        caveat = front_caveat([x for x, _ in pts], cost_key, noise) if pts else None
        front = [] if caveat else sorted(pareto(pts, direction), key=lambda i: pts[i][0])
        if front:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
            ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=140, facecolors="none",
                       edgecolors="k")
        if caveat:
            ax.text(0.5, 0.02, caveat, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, wrap=True,
                    bbox={"boxstyle": "round", "fc": "lightyellow", "ec": "grey"})
        teacher = usable[0].data.metrics.get(key.replace("student", "teacher"))
        if teacher is not None:
            ax.axhline(teacher, color="grey", lw=1, ls=":", label=f"teacher ({teacher:.4g})")
        ax.set_xlabel(cost_label)
        ax.set_ylabel(f"{key.split('/')[-1]} (held out, {'higher' if direction == 'max' else 'lower'} is better)")
        ax.grid(alpha=0.3)
    hollow = " (hollow: before training)" if any(before.get(r.info.run_id) for r in usable) else ""
    axes[0].set_title("quality vs student size" + hollow)
    axes[-1].set_title("quality vs student latency" + hollow)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(labels) / 3), 1, 1))  # room for the legend below
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colours(plt, runs: Sequence) -> Dict[str, tuple]:
    """One colour per run, none repeated up to 20 runs (matplotlib's default cycle repeats after 10)."""
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    return {r.info.run_id: cmap(i % cmap.N) for i, r in enumerate(runs)}


def loss_panels(runs: Sequence) -> List[str]:
    """The training-loss metrics to draw, each in its own panel (terms live on different scales: a KL of 0.01 and a
    cross-entropy of 3 on one axis hide each other): train/loss, then every term the runs' losses have, when a
    run has more than one term or its term has another weight (else the term is the total)."""
    terms: List[str] = []
    for r in runs:
        names = term_names(r)
        weights = [r.data.params.get(f"{LOSS}.{n}.weight", "1.0") for n in names]
        if len(names) > 1 or any(float(w) != 1.0 for w in weights):
            terms += [n for n in names if f"train/{n}" in r.data.metrics and n not in terms]
    return ["train/loss"] + [f"train/{t}" for t in terms]


def plot_losses(client, runs: Sequence, path: Path) -> Optional[Path]:
    """The training loss per run against the step, and each loss term in a panel of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = varied_params(runs)
    panels = loss_panels(runs)
    curves = {key: [(r, sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)) for r in runs]
              for key in panels}  # each history fetched once
    curves = {key: [(r, h) for r, h in got if h] for key, got in curves.items()}
    panels = [key for key in panels if curves[key]]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    colours = _colours(plt, runs)
    for ax, key in zip(axes.flat, panels):
        for r, hist in curves[key]:
            ax.plot([m.step for m in hist], [m.value for m in hist], marker="." if len(hist) < 60 else None,
                    color=colours[r.info.run_id], label=_label(r, params))
        log_scale = all(m.value > 0 for _, hist in curves[key] for m in hist)
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        name = "training loss (weighted sum of terms)" if key == "train/loss" else f"term {key.split('/')[-1]}"
        ax.set_ylabel(name + (", log scale" if log_scale else ""))
        ax.grid(alpha=0.3)
        points = max(len(h) for _, h in curves[key])
        if points < 5:
            ax.set_title(f"{points} logged points: lower train.log_every for a curve", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper right")
    fig.suptitle("training loss per run" + (" and per term" if len(panels) > 1 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


GAP = ("eval/student/kl_to_teacher", "eval/student/kl_to_teacher_on_samples")


def plot_teacher_gap(client, runs: Sequence, path: Path) -> Optional[Path]:
    """Causal-LM runs: the student's KL to the teacher on held-out data (solid) and on its own samples of held-out
    prompts (dashed) at each evaluation, per run. A student that matches the teacher on the data but drifts from it
    on its own outputs is the "teacher hacking" of off-policy distillation; on-policy training narrows the gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_gap = [r for r in runs if all(k in r.data.metrics for k in GAP)]
    if not with_gap:
        return None
    params = varied_params(with_gap)
    colours = _colours(plt, with_gap)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in with_gap:
        for key, style, what in ((GAP[0], "-", "held-out data"), (GAP[1], "--", "own samples")):
            hist = sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
            ax.plot([m.step for m in hist], [m.value for m in hist], style, marker=".", color=colours[r.info.run_id],
                    label=f"{_label(r, params)} ({what})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(teacher || student) per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("student vs teacher: on held-out data (solid) and on the student's own samples (dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(client, runs: Sequence, out_dir: Path) -> Dict[str, Path]:
    """summary.csv, summary.md, results.csv, results.md, pareto.png, loss_curves.png, and for causal-LM runs
    teacher_gap.png, in out_dir (plots only when there is data)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = starting_values(client, runs)  # each student's held-out metrics before training
    columns, rows = table(runs, before)
    files = {"summary.csv": out_dir / "summary.csv", "summary.md": out_dir / "summary.md"}
    files["summary.csv"].write_text(to_csv(columns, rows))
    files["summary.md"].write_text(summary_markdown(columns, rows))
    csv_columns, csv_rows, md_columns, md_rows = results(runs, before)  # mean +- std over seeds, the teacher first
    if csv_rows:
        files["results.csv"], files["results.md"] = out_dir / "results.csv", out_dir / "results.md"
        files["results.csv"].write_text(to_csv(csv_columns, csv_rows))
        files["results.md"].write_text(results_markdown(md_columns, md_rows))
    for name, made in (("pareto.png", plot_pareto(runs, out_dir / "pareto.png", before, latency_noise(client, runs))),
                       ("loss_curves.png", plot_losses(client, runs, out_dir / "loss_curves.png")),
                       ("teacher_gap.png", plot_teacher_gap(client, runs, out_dir / "teacher_gap.png"))):
        if made:
            files[name] = made
    return files
