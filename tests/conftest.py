"""Shared fixtures: a tiny random BERT (built from a BertConfig, no download) and toy tasks."""

import os
import random
import shutil
import signal
import tempfile

import pytest
import torch

torch.set_num_threads(1)  # the machine is shared; tests must not fight over cores
os.environ["COLDFUSION_CACHE"] = tempfile.mkdtemp(prefix="coldfusion-cache-")  # never the user's cache
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="datasets-cache-")  # nor that of datasets

POSITIVE = ["good", "great", "fine", "happy", "love", "nice"]
NEGATIVE = ["bad", "awful", "poor", "sad", "hate", "ugly"]
TOPICS = ["sport", "match", "goal", "market", "stock", "price", "movie", "actor", "film"]
FILLER = ["the", "a", "is", "was", "it", "this", "and", "very", "so", "really"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with a word-level vocabulary, saved like any HF model."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + TOPICS + FILLER))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


def make_sentiment_rows(n: int, seed: int, words_pos=POSITIVE, words_neg=NEGATIVE) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        cue = rng.choice(words_pos if label else words_neg)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))] + [cue]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def make_topic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    groups = {"sport": TOPICS[:3], "finance": TOPICS[3:6], "cinema": TOPICS[6:]}
    names = sorted(groups)
    rows = []
    for i in range(n):
        label = names[i % 3]
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))] + [rng.choice(groups[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session")
def toy_task_files(tmp_path_factory):
    """Two small csv tasks (sentiment, topic) that a tiny model can learn."""
    import pandas as pd

    root = tmp_path_factory.mktemp("toy-tasks")
    pd.DataFrame(make_sentiment_rows(400, seed=1)).to_csv(root / "sentiment.csv", index=False)
    pd.DataFrame(make_topic_rows(450, seed=2)).to_csv(root / "topic.csv", index=False)
    return {"sentiment": root / "sentiment.csv", "topic": root / "topic.csv"}


@pytest.fixture
def repo(tmp_path, tiny_model_dir):
    """A repository whose version 1 is the tiny BERT's body (with its model files)."""
    from transformers import AutoModel

    from coldfusion.models.encoder import body_tensors
    from coldfusion.repository import Repository

    repository = Repository(tmp_path / "repo")
    repository.add_version(body_tensors(AutoModel.from_pretrained(tiny_model_dir)), model_source=str(tiny_model_dir))
    return repository


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for the session (tests/servers.py)."""
    from servers import _stop, start_postgres

    server, proc, home = start_postgres()
    yield server
    _stop(proc, signal.SIGINT)  # fast shutdown
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server (SeaweedFS) on 127.0.0.1 for the session (tests/servers.py)."""
    from servers import _stop, start_s3

    server, proc, home = start_s3()
    yield server
    _stop(proc)
    shutil.rmtree(home, ignore_errors=True)
