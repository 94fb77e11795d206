"""Tasks from local files (csv / tsv / jsonl / parquet) and Hugging Face `datasets` ids.

User data is checked row by row before anything trains on it: a missing or unknown
label, an empty text, or a text so long it must be a parsing accident (an unclosed quote
swallows the rest of a csv) is an error that names the file and the row (the line, for
jsonl).
"""

import json
import math
import re
from pathlib import Path

import pandas as pd

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.runtime import derive_seed
from coldfusion.tasks.task import Split, Task, complete_splits, encode_labels, natural_label_order, split_pool

# Far beyond any max_length; a longer text is almost always a parsing accident.
MAX_TEXT_CHARS = 100_000


def read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped); `attrs["lines"]` maps rows to lines."""
    records, lines = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ColdFusionError(f"{path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno})"
                                      ) from None
            if not isinstance(record, dict):
                raise ColdFusionError(f"{path}, line {number}: expected a JSON object with the columns as keys, "
                                      f"not a {type(record).__name__}")
            records.append(record)
            lines.append(number)
    frame = pd.DataFrame.from_records(records)
    frame.attrs["lines"] = lines
    return frame


READERS = {
    ".csv": lambda p: pd.read_csv(p, keep_default_na=False, dtype=str),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", keep_default_na=False, dtype=str),
    ".jsonl": read_jsonl,
    ".json": read_jsonl,
    ".parquet": pd.read_parquet,
}


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise ColdFusionError(f"dataset file {path} does not exist")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ColdFusionError(f"{path}: unsupported file type '{path.suffix}'; use one of {sorted(READERS)}")
    try:
        return reader(path)
    except ColdFusionError:
        raise
    except Exception as exc:  # pandas raises many types; the user needs the file name
        raise ColdFusionError(f"{path}: could not be read as {path.suffix[1:]}: {exc}") from exc


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _check_rows(frame: pd.DataFrame, where: str, text_columns: list[str], label_column: str,
                label_names: list[str] | None) -> None:
    """The first bad row, named by its line (jsonl) or its row number after the header."""
    lines = frame.attrs.get("lines")
    at = lambda i: f"{where}, line {lines[i]}" if lines else f"{where}, row {i + 1}"  # noqa: E731
    known = set(label_names) if label_names is not None else None
    for i, label in enumerate(frame[label_column].tolist()):
        if _missing(label):
            raise ColdFusionError(f"{at(i)}: no label in column '{label_column}'")
        if known is not None and str(label) not in known:
            raise ColdFusionError(f"{at(i)}: label '{label}' is not in the label set {label_names}")
    for column in text_columns:
        for i, text in enumerate(frame[column].tolist()):
            if _missing(text):
                raise ColdFusionError(f"{at(i)}: the text in column '{column}' is empty; fill it in or drop the row")
            if len(str(text)) > MAX_TEXT_CHARS:
                raise ColdFusionError(
                    f"{at(i)}: the text in column '{column}' has {len(str(text)):,} characters (at most "
                    f"{MAX_TEXT_CHARS:,}); is a quote left open above it? Split long documents first")


def _check_not_regression(labels: pd.Series, where: str, label_column: str) -> None:
    """Real-valued labels would each become a class of their own: refuse them by name."""
    numbers = pd.to_numeric(labels, errors="coerce")
    if numbers.notna().all() and (numbers != numbers.round()).any():
        example = labels[numbers != numbers.round()].iloc[0]
        raise ColdFusionError(
            f"{where}: the labels in column '{label_column}' are real numbers (such as {example}), a regression "
            "task; coldfusion trains classifiers only: bin the values into classes first")


def frame_to_split(
    frame: pd.DataFrame, where: str, text_column: str, label_column: str,
    pair_column: str | None, label_names: list[str] | None,
) -> tuple[Split, list[str]]:
    """Validate columns and labels of one table and turn it into a Split."""
    wanted = [c for c in (text_column, pair_column, label_column) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ColdFusionError(
            f"{where}: no column {missing}; its columns are {list(frame.columns)} "
            "(set text_column / label_column in the task spec)"
        )
    if len(frame) == 0:
        raise ColdFusionError(f"{where}: the dataset is empty")
    _check_rows(frame, where, [c for c in (text_column, pair_column) if c], label_column, label_names)
    _check_not_regression(frame[label_column], where, label_column)
    labels, names = encode_labels([str(v) for v in frame[label_column].tolist()], label_names)  # rows checked
    texts = [str(v) for v in frame[text_column].tolist()]
    pairs = None if pair_column is None else [str(v) for v in frame[pair_column].tolist()]
    return Split(texts, labels, pairs), names


def load_file_task(
    name: str, *, path: Path | None = None, train: Path | None = None,
    validation: Path | None = None, test: Path | None = None,
    text_column: str = "text", label_column: str = "label",
    pair_column: str | None = None, label_names: list[str] | None = None,
) -> Task:
    """One file (split 70/10/20 deterministically) or separate train/validation/test files."""
    cols = dict(text_column=text_column, label_column=label_column, pair_column=pair_column)
    if path is not None:
        pool, names = frame_to_split(read_table(path), str(path), label_names=label_names, **cols)
        tr, va, te = split_pool(pool, seed=derive_seed("split", name))
        return Task(name, names, tr, va, te, source=str(path))
    if train is None:
        raise ColdFusionError(f"task '{name}': give either `path` or `train` (+ `validation`, `test`)")
    paths = {s: p for s, p in (("train", train), ("validation", validation), ("test", test)) if p}
    tables = {s: read_table(p) for s, p in paths.items()}
    if label_names is None:  # one label set for all splits
        label_names = natural_label_order(
            v for t in tables.values() if label_column in t.columns for v in t[label_column].tolist()
        )
    splits = {s: frame_to_split(t, str(paths[s]), label_names=label_names, **cols)[0] for s, t in tables.items()}
    tr, va, te = complete_splits(name, splits["train"], splits.get("validation"), splits.get("test"))
    return Task(name, label_names, tr, va, te, source=str(train))


def load_hub_task(
    name: str, dataset: str, *, config: str | None = None, text_column: str = "text",
    label_column: str = "label", pair_column: str | None = None, splits: dict[str, str] | None = None,
) -> Task:
    """A Hugging Face dataset: a hub id (needs the hub or a local datasets cache) or a local
    directory of data files, through the same `datasets.load_dataset` call.

    `splits` maps train / validation / test to the dataset's own split names where they
    differ. A ClassLabel column's ints become its names. -1 means "no label" (GLUE's test
    splits): a split with no labelled row is set aside as if absent (its test split is then
    carved from the others, as for a file task); a split with only some rows unlabelled is
    an error naming the first one, as is an int outside the label set. Formats other than
    classification of one text or a pair (regression, multiple choice) are refused by name.
    """
    try:
        import datasets
    except ImportError:
        raise ColdFusionError("Hugging Face datasets is not installed: pip install datasets") from None
    try:
        ds = datasets.load_dataset(dataset, config)
    except Exception as exc:  # noqa: BLE001 (network, missing files, a bad script: all "could not load")
        raise ColdFusionError(
            f"could not load the Hugging Face dataset '{dataset}' ({type(exc).__name__}: {exc}). "
            "Without network access use a built-in task, a local csv/jsonl/parquet file, or a local "
            "directory of data files as `hf_dataset`."
        ) from None
    if splits:
        unknown = sorted(set(splits.values()) - set(ds))
        if unknown:
            raise ColdFusionError(f"Hugging Face dataset '{dataset}' has no split {unknown} (its splits: {list(ds)})")
        ds = {ours: ds[theirs] for ours, theirs in splits.items()}
    if "train" not in ds:
        raise ColdFusionError(f"Hugging Face dataset '{dataset}' has no train split (its splits: {list(ds)}); "
                              "name it with `hf_splits: {train: ...}`")
    _check_classification(ds["train"].features, dataset, text_column, pair_column, label_column)
    feature = ds["train"].features.get(label_column)
    label_names = list(getattr(feature, "names", []) or []) or None
    frames = {}
    for split in ds:
        frame = ds[split].to_pandas()
        if label_names is not None and label_column in frame.columns:
            frame = _named_labels(frame, f"{dataset}/{split}", label_column, label_names)
            if frame is None:
                continue
        frames[split] = frame
    cols = dict(text_column=text_column, label_column=label_column, pair_column=pair_column)
    splits = {s: frame_to_split(f, f"{dataset}/{s}", label_names=label_names, **cols) for s, f in frames.items()}
    part = lambda s: splits[s][0] if s in splits else None  # noqa: E731
    tr, va, te = complete_splits(name, part("train"), part("validation"), part("test"))
    return Task(name, splits["train"][1], tr, va, te, source=f"hf:{dataset}")


# Columns that make a dataset multiple choice: COPA's choice1/2, SWAG's ending0..3,
# HellaSwag's endings, PIQA's sol1/2, ARC's choices, RACE's options.
MULTIPLE_CHOICE = re.compile(r"(choice|ending|option|sol)\d+|choices|endings|options")


def _check_classification(features, dataset: str, text_column: str, pair_column: str | None,
                          label_column: str) -> None:
    """Refuse, by name, the formats a text classifier would silently get wrong."""
    label = features.get(label_column)
    if str(getattr(label, "dtype", "")).startswith("float"):
        raise ColdFusionError(
            f"Hugging Face dataset '{dataset}': column '{label_column}' holds real numbers ({label.dtype}), a "
            "regression task (as STS-B); coldfusion trains classifiers only; bin the scores into classes in a file")
    choices = sorted(c for c in features if MULTIPLE_CHOICE.fullmatch(c))
    if choices:
        raise ColdFusionError(
            f"Hugging Face dataset '{dataset}' is a multiple-choice task (columns {choices}); coldfusion trains "
            "classifiers of one text or a text pair only")
    for column in (text_column, pair_column):
        feature = features.get(column) if column else None
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ColdFusionError(
                f"Hugging Face dataset '{dataset}': column '{column}' holds {features[column]}, not text; "
                "set text_column / pair_column to text columns")


def _named_labels(frame: pd.DataFrame, where: str, label_column: str, label_names: list[str]) -> pd.DataFrame | None:
    """The frame with ClassLabel ints replaced by their names; None if no row has a label."""
    values = frame[label_column].tolist()
    unlabelled = [i for i, v in enumerate(values) if v is None or v == -1]
    if len(unlabelled) == len(values):
        return None
    if unlabelled:
        raise ColdFusionError(f"{where}, row {unlabelled[0] + 1}: no label (-1) while other rows have one; "
                              "drop the unlabelled rows or give the split as a file")
    for i, v in enumerate(values):
        if not 0 <= v < len(label_names):
            raise ColdFusionError(f"{where}, row {i + 1}: label {v} is not one of the {len(label_names)} "
                                  f"classes {label_names}")
    frame = frame.copy()
    frame[label_column] = [label_names[v] for v in values]
    return frame
