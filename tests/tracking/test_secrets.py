"""Credentials never reach MLflow: params, tags, run names, the logged config and overrides are redacted."""
import pytest

from support import RANK, kdrun, offline_env, ok
from kdrun.secrets import REDACTED, redact, redact_arg, redact_text, secret_key

HF = "hf_" + "Ab3" * 12
GHP = "ghp_" + "Zx9" * 12
PASSWORD = "s3cret-Pw"


@pytest.mark.parametrize("text,expect", [
    (f"https://bob:{PASSWORD}@mlflow.example.com:5000", f"https://bob:{REDACTED}@mlflow.example.com:5000"),
    (f"postgresql://admin:{PASSWORD}@db/kd", f"postgresql://admin:{REDACTED}@db/kd"),
    (f"token {HF} here", f"token {REDACTED} here"),
    (f"run-{GHP}", f"run-{REDACTED}"),
    ("sk-" + "a1" * 15, REDACTED),
    ("AKIA" + "ABCDEFGH23456789", REDACTED),
    ("Authorization: Bearer abc.def-ghi_jkl", f"Authorization: Bearer {REDACTED}"),
    ("eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.SflKxwRJSMeKKF2QT4", REDACTED),
    ("https://mlflow.example.com:5000", "https://mlflow.example.com:5000"),  # no credentials: unchanged
    ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
    (f"#0 : train.seed=1 +tracking.tags.password={PASSWORD} [db.api_key={PASSWORD}]",  # a launcher's log line
     f"#0 : train.seed=1 +tracking.tags.password={REDACTED} [db.api_key={REDACTED}]"),
    ("kdrun's settings are key=value overrides", "kdrun's settings are key=value overrides"),  # words, not a secret
])
def test_credential_looking_strings_are_redacted(text, expect):
    assert redact_text(text) == expect


@pytest.mark.parametrize("key,secret", [("password", True), ("db.passwd", True), ("HF_TOKEN", True),
                                        ("api_key", True), ("AWS_SECRET_ACCESS_KEY", True), ("auth", True),
                                        ("tracking.tags.hf_token", True), ("credential", True),
                                        ("tokenizer", False), ("max_length", False), ("keys", False),
                                        ("monkey", False), ("student.name", False), ("teacher.top_k", False)])
def test_secret_keys(key, secret):
    assert secret_key(key) is secret


def test_overrides_and_trees():
    assert redact_arg("+tracking.tags.api_key=abc") == f"+tracking.tags.api_key={REDACTED}"
    assert redact_arg("optimizer.lr=3e-5") == "optimizer.lr=3e-5"
    tree = {"a": {"password": "x", "list": [f"u:{PASSWORD}", f"https://u:{PASSWORD}@h"], "n": 3, "token": None}}
    assert redact(tree) == {"a": {"password": REDACTED, "list": [f"u:{PASSWORD}", f"https://u:{REDACTED}@h"],
                                  "n": 3, "token": None}}


def test_planted_credentials_never_reach_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    env = offline_env(tmp_path)
    r = ok(kdrun([*RANK, "train.max_steps=1", "train.batch_size=4", "tracking.experiment=secrets",
                  f"tracking.run_name=run-{GHP}", f"+tracking.tags.hf_token={HF}",
                  f"+tracking.tags.db=postgresql://admin:{PASSWORD}@db/kd", "+tracking.tags.team=search",
                  f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, env))
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])[0]
    logged = [run.info.run_name, *run.data.params.values(), *run.data.tags.values()]
    for artifact in ("config.yaml", "overrides.txt"):
        logged.append(open(client.download_artifacts(run.info.run_id, artifact, str(tmp_path))).read())
    text = "\n".join(logged) + r.stdout + r.stderr
    for secret in (HF, GHP, PASSWORD):
        assert secret not in text
    for f in (tmp_path / "out").rglob("*"):  # Hydra's .hydra/*.yaml and the job log too (issue 20, defect 7)
        if f.is_file():
            data = f.read_bytes()
            assert not any(s.encode() in data for s in (HF, GHP, PASSWORD)), f
    assert run.data.tags["team"] == "search" and run.data.tags["hf_token"] == REDACTED
    assert run.data.tags["db"] == f"postgresql://admin:{REDACTED}@db/kd"
    assert run.data.params["tracking.tags.hf_token"] == REDACTED
    assert f"+tracking.tags.hf_token={REDACTED}" in run.data.tags["kdrun.command"]
