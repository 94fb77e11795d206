"""Tasks: labelled text-classification datasets with fixed splits."""

from coldfusion.tasks.catalog import CATALOG, load_builtin
from coldfusion.tasks.files import load_file_task, load_hub_task
from coldfusion.tasks.spec import TaskSpec
from coldfusion.tasks.task import Split, Task


def load_task(spec: TaskSpec | str) -> Task:
    """Resolve a task spec (or a built-in name) to a Task."""
    spec = TaskSpec.model_validate(spec)
    cols = dict(text_column=spec.text_column, label_column=spec.label_column, pair_column=spec.pair_column)
    if spec.hf_dataset is not None:
        return load_hub_task(spec.name, spec.hf_dataset, config=spec.hf_config, **cols)
    if spec.path is not None or spec.train is not None:
        return load_file_task(spec.name, path=spec.path, train=spec.train, validation=spec.validation,
                              test=spec.test, label_names=spec.label_names, **cols)
    return load_builtin(spec.name)


__all__ = ["CATALOG", "Split", "Task", "TaskSpec", "load_builtin", "load_task"]
