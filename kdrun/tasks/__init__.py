"""Task families: each turns its data into training examples and batches, runs a precomputed teacher
when asked, and evaluates student and teacher on the same held-out data.

    examples() / lengths()      training examples, and their lengths for bucketing
    precompute()                the examples with the teacher's outputs attached (teacher.mode=precompute)
    collate(online)             examples -> a batch: model features, labels, masks, teacher outputs
    evaluate(model, who)        held-out metrics ("teacher" first: the student's agreement needs it)
"""


def task_class(name: str):
    if name == "ranking":
        from kdrun.tasks.ranking import RankingTask
        return RankingTask
    if name == "classification":
        from kdrun.tasks.classification import ClassificationTask
        return ClassificationTask
    if name == "causal_lm":
        from kdrun.tasks.causal_lm import CausalLMTask
        return CausalLMTask
    raise ValueError(f"unknown task {name!r}")
