"""Task families: each turns its data into training examples and batches, runs a precomputed teacher
when asked, and evaluates student and teacher on the same held-out data.

    examples() / lengths()      training examples, and their lengths for bucketing
    fingerprint()               SHA-256 of the training data as a teacher sees it (for the teacher-output cache)
    teacher_outputs(teacher)    a teacher's outputs over every training example, stacked tensors
    attach(outputs)             the examples with those outputs attached (teacher.mode=precompute, scores_file)
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
