"""Tasks: labelled text-classification datasets with fixed splits."""

from typing import TYPE_CHECKING

from coldfusion.infra.config_files import validate_config
from coldfusion.infra.lazy import lazy_exports
from coldfusion.tasks.spec import TaskSpec

if TYPE_CHECKING:
    from coldfusion.tasks.task import Task

_LAZY = {"CATALOG": "coldfusion.tasks.catalog", "load_builtin": "coldfusion.tasks.catalog",
         "load_file_task": "coldfusion.tasks.files", "load_hub_task": "coldfusion.tasks.files",
         "Split": "coldfusion.tasks.task", "Task": "coldfusion.tasks.task"}


def load_task(spec: "TaskSpec | str") -> "Task":
    """Resolve a task spec (or a built-in name) to a Task."""
    from coldfusion.tasks.catalog import load_builtin
    from coldfusion.tasks.files import load_file_task, load_hub_task

    spec = validate_config(TaskSpec, spec, "task")
    cols = dict(text_column=spec.text_column, label_column=spec.label_column, pair_column=spec.pair_column)
    if spec.hf_dataset is not None:
        return load_hub_task(spec.name, spec.hf_dataset, config=spec.hf_config, splits=spec.hf_splits, **cols)
    if spec.path is not None or spec.train is not None:
        return load_file_task(spec.name, path=spec.path, train=spec.train, validation=spec.validation,
                              test=spec.test, label_names=spec.label_names, **cols)
    return load_builtin(spec.name)


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["CATALOG", "Split", "Task", "TaskSpec", "load_builtin", "load_task"]
