"""The saved student as an MLflow logged model (MLflow 3), in the flavor its users load it with: sentence-transformers
for a bi-encoder, transformers for a classifier (text-classification) or a causal LM (text-generation), and a pyfunc
over kdrun's own scorer for ColBERT and cross-encoder students (scores (query, passage) rows). Each with a signature
and an input example from the held-out data, linked to the run's metrics at its step (MLflow does that when a model
is logged at a step), and registered as a new version of `register_as` when that is set.

Built from the saved directory alone (its kdrun_scorer.json names the kind), so that kdrun-replay can log it later
when the store was down at the end of the run.
"""
from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# the logged model's name in the run: MLflow's convention. Not "student": MLflow resolves runs:/RUN/student (and a
# listing of the run's student/ artifacts) to a logged model of that name, which shadows the plain folder
NAME = "model"


def kind_of(directory: str | Path) -> str:
    """The kind of student kdrun saved in `directory` (kdrun_scorer.json)."""
    return json.loads((Path(directory) / "kdrun_scorer.json").read_text())["kind"]


def _requirements(*packages: str) -> List[str]:
    """Pinned pip requirements of the installed packages (without a local label such as +cpu: installable from PyPI).
    Given to MLflow so that it does not infer them by loading the model in a subprocess (19 s for MiniLM here)."""
    pins = []
    for p in packages:
        try:
            pins.append(f"{p}=={version(p).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(p)
    return pins


def _pyfunc_class():
    import mlflow.pyfunc

    class KdrunScorer(mlflow.pyfunc.PythonModel):
        """A kdrun ranking student (ColBERT or cross-encoder): predict() takes rows with `query` and `passage` and
        returns each row's relevance score, computed by kdrun's own scorer (the one the run evaluated with)."""

        def load_context(self, context):
            from kdrun.models.encoders import load_scorer

            self.scorer = load_scorer(context.artifacts["student"]).eval()

        def predict(self, context, model_input, params=None):
            import numpy as np
            import torch

            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            order: Dict[str, List[int]] = {}  # one scorer call per distinct query, its passages together
            for i, r in enumerate(rows):
                order.setdefault(r["query"], []).append(i)
            out = np.zeros(len(rows), dtype=np.float32)
            queries = list(order)
            scores = self.scorer.score_lists(queries, [[rows[i]["passage"] for i in order[q]] for q in queries],
                                             batch_size=64, device=torch.device("cpu"))
            for q, s in zip(queries, scores):
                out[order[q]] = s.float().numpy()
            return out

    return KdrunScorer


def log(directory: str | Path, *, examples: Sequence, step: int, register_as: Optional[str] = None,
        run_id: Optional[str] = None):
    """Log the student saved in `directory` to the active MLflow run (or `run_id`) as a logged model named
    NAME at `step`; `examples`: held-out inputs for the input example ((query, passage) pairs for a ranking
    student, texts otherwise). Returns MLflow's ModelInfo (model_id, model_uri, registered_model_version)."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    d = Path(directory)
    kind = kind_of(d)
    common = dict(name=NAME, step=step, registered_model_name=register_as, await_registration_for=60)
    if kind == "bi_encoder":
        from sentence_transformers import SentenceTransformer

        texts = [t for pair in examples for t in pair][:4]
        return mlflow.sentence_transformers.log_model(
            SentenceTransformer(str(d), device="cpu", local_files_only=True), input_example=texts,
            pip_requirements=_requirements("torch", "transformers", "sentence-transformers"), **common)
    if kind in ("classifier", "causal_lm"):
        import transformers

        task = "text-classification" if kind == "classifier" else "text-generation"
        auto = transformers.AutoModelForSequenceClassification if kind == "classifier" else transformers.AutoModelForCausalLM
        components = {"model": auto.from_pretrained(d), "tokenizer": transformers.AutoTokenizer.from_pretrained(d)}
        texts = list(examples)[:2]
        card = d / "README.md"  # kdrun's model card (else MLflow looks for one on the Hub)
        if card.is_file():
            from huggingface_hub import ModelCard

            common["model_card"] = ModelCard(card.read_text())
        return mlflow.transformers.log_model(
            components, task=task, input_example=texts, signature=pipeline_signature(task),
            pip_requirements=_requirements("torch", "transformers"), **common)
    if kind in ("cross_encoder", "late_interaction"):
        import kdrun

        frame = pd.DataFrame([{"query": q, "passage": p} for q, p in list(examples)[:4]])
        return mlflow.pyfunc.log_model(
            python_model=_pyfunc_class()(), artifacts={"student": str(d)}, code_paths=[str(Path(kdrun.__file__).parent)],
            signature=infer_signature(frame, model_output_for(d, frame)), input_example=frame,
            pip_requirements=_requirements("torch", "transformers", "safetensors", "hydra-core", "omegaconf"), **common)
    raise ValueError(f"{d}: kdrun_scorer.json names an unknown kind of student '{kind}'")


def pipeline_signature(task: str):
    """The signature MLflow infers for a transformers pipeline of `task` from a list of texts: one string in; a label
    and a score out (text-classification), a string out (text-generation). Given, MLflow does not infer it by running
    the pipeline on the input example (a generation: 8 s for the causal-LM demo's student on 2 CPU cores); it still
    serves the input example once to validate the logged model."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    outputs = [ColSpec("string", name="label"), ColSpec("double", name="score")] if task == "text-classification" \
        else [ColSpec("string")]
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema(outputs))


def model_output_for(directory: Path, frame):
    """The scores the pyfunc model gives for `frame` (for its signature): kdrun's scorer loaded from `directory`."""
    from types import SimpleNamespace

    model = _pyfunc_class()()
    model.load_context(SimpleNamespace(artifacts={"student": str(directory)}))
    return model.predict(None, frame)
