"""The student's model card: `student/README.md` in Hugging Face's conventions (YAML front matter with base model,
library, pipeline tag, tags, datasets, metrics and a model-index; then prose), written from the run: the teacher, the
student's initialisation, the loss terms with their weights, the data, the held-out metrics before and after training
and the teacher's, the exact command, kdrun's version and commit. Config wiring and text only."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import yaml

# per kind of student: (library that loads it, Hugging Face pipeline tag, task type in the model-index)
KINDS = {"bi_encoder": ("sentence-transformers", "sentence-similarity", "retrieval"),
         "late_interaction": ("sentence-transformers", "sentence-similarity", "retrieval"),  # MultiVectorEncoder
         "cross_encoder": ("transformers", "text-ranking", "reranking"),
         "classifier": ("transformers", "text-classification", "text-classification"),
         "causal_lm": ("transformers", "text-generation", "text-generation")}
CARD = "README.md"


def _model(params: Dict[str, str], who: str) -> Optional[str]:
    for key in (f"{who}.name", f"{who}.path"):  # a hub name first: what base_model means on the Hub
        value = params.get(key)
        if value not in (None, "", "None", "null") and not str(value).startswith("kdrun-tiny/"):  # (not on the Hub)
            return str(value)
    return None


def _weights(params: Dict[str, str]) -> Dict[str, str]:
    """{term: weight} of the loss as it ran (params holds loss.terms.NAME.weight)."""
    return {k[len("loss.terms."):-len(".weight")]: v for k, v in params.items()
            if k.startswith("loss.terms.") and k.endswith(".weight") and k.count(".") == 3}


def text(*, kind: str, params: Dict[str, str], data_name: str, data_source: str, before: Dict[str, float],
         after: Dict[str, float], teacher: Dict[str, float], command: str, version: str, commit: Optional[str]) -> str:
    """The card's text: front matter, then what the run was."""
    library, pipeline_tag, task_type = KINDS.get(kind, ("transformers", None, kind))
    init = params.get("student.init", "pretrained")
    base = {"pretrained": _model(params, "student"), "teacher_layers": _model(params, "teacher")}.get(init)
    terms = _weights(params)
    front = {
        **({"base_model": base} if base else {}),
        "library_name": library,
        **({"pipeline_tag": pipeline_tag} if pipeline_tag else {}),
        "tags": ["kdrun", "knowledge-distillation", *terms,
                 *(["sentence-transformers"] if library == "sentence-transformers" else []),
                 *(["ColBERT", "late-interaction"] if kind == "late_interaction" else [])],
        "datasets": [data_name],
        "metrics": sorted(after),
        "model-index": [{"name": f"kdrun student ({kind})", "results": [{
            "task": {"type": task_type},
            "dataset": {"name": data_name, "type": data_name, "split": "held-out"},
            "metrics": [{"type": k, "value": round(float(v), 6), "name": f"held-out {k}"} for k, v in after.items()],
        }]}],
    }
    teacher_model = _model(params, "teacher")
    rows = "\n".join(f"| {k} | {before.get(k, float('nan')):.4f} | {v:.4f} | "
                     f"{f'{teacher[k]:.4f}' if k in teacher else '-'} |" for k, v in after.items())
    loss = ", ".join(f"{name} (weight {w})" for name, w in terms.items()) or "-"
    init_line = {"pretrained": f"pretrained weights of `{base}`", "teacher_layers":
                 f"the teacher's embeddings and layers {params.get('student.layers', '?')}",
                 "scratch": "random weights in a resized copy of the teacher's architecture"}.get(init, init)
    body = f"""
# kdrun student: {kind.replace('_', ' ')}

Distilled with kdrun from the teacher `{teacher_model or params.get('teacher.scores_file') or '-'}`
(teacher mode `{params.get('teacher.mode', '-')}`, kind `{params.get('teacher.kind', '-')}`).

- **Student**: {init_line}; {params.get('student.arch', kind)}, max length {params.get('student.max_length', '-')}
- **Loss**: {loss}
- **Data**: {data_name} ({data_source})
- **Training**: {params.get('train.max_steps', '-')} steps, batch {params.get('train.batch_size', '-')}, optimizer \
lr {params.get('optimizer.lr', '-')}, seed {params.get('train.seed', '-')}

## Held-out metrics

| metric | student before | student after | teacher |
|---|---|---|---|
{rows}

## Reproduce

```
{command}
```

kdrun {version}{f', commit {commit}' if commit else ''}.
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body


def write(directory: str | Path, **facts) -> Path:
    """`directory`/README.md from text(**facts)."""
    path = Path(directory) / CARD
    path.write_text(text(**facts))
    return path


def front_matter(path: str | Path) -> Dict:
    """The YAML front matter of a card (what the Hub reads)."""
    content = Path(path).read_text()
    if not content.startswith("---\n"):
        raise ValueError(f"{path}: no front matter")
    return yaml.safe_load(content[4:content.index("\n---\n", 4)])
