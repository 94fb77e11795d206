"""Training throughput and accuracy: our finetune path vs the Hugging Face Trainer at its best.

Systems, on the same model (the bundled MiniLM), examples, batch size, max length,
learning rates and threads, alternated `--repeats` times so all see the same machine load:

- `ours`: our default path (`precision: auto`, bf16 with fp32 master weights on a CPU
  with native bf16; the cheap dropout of the CPU fast path);
- `ours_fp32`: `precision: fp32`, the reference path (torch's own kernels);
- `hf_fp32`, `hf_bf16`: the Trainer with dynamic padding (DataCollatorWithPadding), grouped
  by length (`train_sampling_strategy="group_by_length"`), fused AdamW, in fp32 and with its
  own bf16; its best is the faster.

Then a real finetune of each of ours in bf16 and in fp32 on the same data and seeds,
scored on the test split: the accuracy delta says whether the speed costs accuracy.

Feature extraction (frozen bodies, batch 64), what probing and `rank` spend their time
on, is timed in both precisions too.

One JSON line per measurement; per task a final line
`{"metric": "train_speed", "task", "ours_over_hf_best", "ours_over_fp32", "accuracy_delta_points"}`
against targets 1.3, 2.0 and 0.5, and one `{"metric": "extraction_speed", "ours_over_fp32"}`
against 3.0. With `--out FILE`, lines already in FILE are not
measured again (an interrupted run resumes) and new lines are appended.

    python benchmarks/train_speed.py --out benchmarks/results/train_speed.jsonl
    python benchmarks/train_speed.py --tasks movie_sentiment --speed-examples 320 --repeats 1 --seeds 0
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {"ours_over_hf_best": 1.3, "ours_over_fp32": 2.0, "accuracy_delta_points": 0.5}
LENGTHS = {"movie_sentiment": 64, "bbc_topic": 256}  # short texts; long texts at 256 tokens


def ours(task, encoder, examples: int, max_length: int, batch_size: int, precision: str, seed: int,
         epochs: float = 1.0, test_examples: int = 0, device: str = "cpu") -> dict:
    """Throughput of our finetune; with `test_examples`, the test accuracy after it too."""
    from coldfusion.infra.runtime import resolve_precision
    from coldfusion.models.encoder import Classifier
    from coldfusion.training import FinetuneSettings, encode
    from coldfusion.training.evaluate import evaluate
    from coldfusion.training.finetune import finetune

    dtype = resolve_precision(precision, torch.device(device))
    torch.manual_seed(seed)
    model = Classifier(encoder.new_body(), task.num_labels).place(device, dtype)
    data = encode(task.train.head(examples), encoder.tokenizer, max_length)
    settings = FinetuneSettings(epochs=epochs, batch_size=batch_size, lr=5e-5, head_lr=1e-3)
    result = finetune(model, data, None, settings, seed=seed)
    row = {"examples_per_s": result.examples_per_second}
    if test_examples:
        row["accuracy"] = evaluate(model, encode(task.test.head(test_examples), encoder.tokenizer, max_length))[
            "accuracy"]
    return row


def extraction(task, encoder, examples: int, max_length: int, precision: str, device: str = "cpu") -> dict:
    """Throughput of frozen-feature extraction (what probing and `rank` spend their time on)."""
    from coldfusion.infra.runtime import resolve_precision
    from coldfusion.models.encoder import Classifier
    from coldfusion.training import encode
    from coldfusion.training.probe import extract_features

    dtype = resolve_precision(precision, torch.device(device))
    model = Classifier(encoder.new_body(), task.num_labels).place(device, dtype)
    data = encode(task.train.head(examples), encoder.tokenizer, max_length)
    start = time.perf_counter()
    extract_features(model, data, batch_size=64)
    return {"examples_per_s": len(data) / (time.perf_counter() - start)}


def matmul_rates(log: "Log", threads: int, repeats: int) -> None:
    """GFLOP/s of the encoder's matrix products (tokens x 384 x 1536 and back) in fp32 and
    bf16: the ceiling of what bf16 can gain on this machine."""
    for m, k, n in ((2048, 384, 1536), (2048, 1536, 384), (2048, 384, 384)):
        for dtype in (torch.float32, torch.bfloat16):
            key = {"kind": "matmul", "shape": [m, k, n], "dtype": str(dtype).split(".")[-1], "threads": threads}
            if log.find(**key):
                continue
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            best = 0.0
            for _ in range(repeats):
                a @ b
                start = time.perf_counter()
                for _ in range(20):
                    a @ b
                best = max(best, 2 * m * k * n * 20 / (time.perf_counter() - start) / 1e9)
            log.write({**key, "gflop_per_s": round(best, 1)})


def hf_trainer(task, model_dir: str, tokenizer, examples: int, max_length: int, batch_size: int, bf16: bool,
               seed: int, device: str = "cpu") -> dict:
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging

    logging.set_verbosity_error()
    split = task.train.head(examples)
    enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length)
    ds = datasets.Dataset.from_dict({**enc, "labels": split.labels})
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=task.num_labels)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=5e-5,
            warmup_steps=0.06, weight_decay=0.01, report_to="none", save_strategy="no", logging_strategy="no",
            use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=seed,
            train_sampling_strategy="group_by_length",
            bf16=bf16, optim="adamw_torch_fused",
        )
        trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"examples_per_s": len(split) / seconds}


class Log:
    """JSON lines to stdout and, with a file, appended to it; rows already there are reused."""

    def __init__(self, path: Path | None):
        self.path = path
        self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path and path.exists() else []

    def find(self, **key) -> dict | None:
        return next((r for r in self.rows if all(r.get(k) == v for k, v in key.items())), None)

    def write(self, row: dict) -> dict:
        print(json.dumps(row), flush=True)
        if row in self.rows:  # a final line recomputed from the same measurements
            return row
        self.rows.append(row)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def measure_task(name: str, args, log: Log) -> None:
    from coldfusion.models.encoder import Encoder
    from coldfusion.models.names import default_model_dir
    from coldfusion.tasks import load_builtin

    model_dir = str(default_model_dir())
    task, encoder = load_builtin(name), Encoder.load(model_dir)
    max_length = args.max_length or LENGTHS.get(name, 128)
    n = min(args.speed_examples, len(task.train))
    tokens = [len(x) for x in encoder.tokenizer(task.train.head(n).texts, truncation=True,
                                                max_length=max_length)["input_ids"]]
    common = {"task": name, "device": args.device, "examples": n, "batch_size": args.batch_size,
              "max_length": max_length, "threads": args.threads, "mean_tokens": round(sum(tokens) / len(tokens), 1)}
    tok, d, b = encoder.tokenizer, args.device, args.batch_size
    systems = {
        "ours": lambda: ours(task, encoder, n, max_length, b, "auto", 0, device=d),
        "ours_fp32": lambda: ours(task, encoder, n, max_length, b, "fp32", 0, device=d),
        "hf_fp32": lambda: hf_trainer(task, model_dir, tok, n, max_length, b, False, 0, device=d),
        "hf_bf16": lambda: hf_trainer(task, model_dir, tok, n, max_length, b, True, 0, device=d),
    }
    warmed = False
    for repeat in range(args.repeats):  # alternate the systems, so all see the same machine load
        for system, run in systems.items():
            if log.find(kind="speed", system=system, repeat=repeat, **common):
                continue
            if not warmed:  # the first training in a process pays one-off kernel set-up
                ours(task, encoder, b * 2, max_length, b, "auto", 0, device=d)
                ours(task, encoder, b * 2, max_length, b, "fp32", 0, device=d)
                warmed = True
            log.write({"kind": "speed", "system": system, "repeat": repeat,
                       **{k: round(v, 3) for k, v in run().items()}, **common})

    extract_n = min(4 * n, len(task.train))
    for repeat in range(args.repeats):
        for precision in ("auto", "fp32"):
            if log.find(kind="extraction", precision=precision, repeat=repeat, **common):
                continue
            log.write({"kind": "extraction", "precision": precision, "repeat": repeat, "extracted": extract_n,
                       **{k: round(v, 3) for k, v in extraction(task, encoder, extract_n, max_length, precision,
                                                                 d).items()}, **common})

    accuracy_common = {"task": name, "device": args.device,
                       "train_examples": min(args.accuracy_examples, len(task.train)),
                       "test_examples": min(args.test_examples, len(task.test)), "epochs": args.epochs,
                       "max_length": max_length, "batch_size": args.batch_size}
    for seed in args.seeds:
        for precision in ("auto", "fp32"):
            if log.find(kind="accuracy", precision=precision, seed=seed, **accuracy_common):
                continue
            row = ours(task, encoder, accuracy_common["train_examples"], max_length, args.batch_size, precision,
                       seed, epochs=args.epochs, test_examples=accuracy_common["test_examples"], device=d)
            log.write({"kind": "accuracy", "precision": precision, "seed": seed,
                       **{k: round(v, 4) for k, v in row.items()}, **accuracy_common})

    speed = {s: [r["examples_per_s"] for r in log.rows if r.get("kind") == "speed" and r["system"] == s
                 and all(r.get(k) == v for k, v in common.items())] for s in systems}
    best = {s: max(v) for s, v in speed.items() if v}
    accuracy = {p: {r["seed"]: r["accuracy"] for r in log.rows if r.get("kind") == "accuracy"
                    and r["precision"] == p and all(r.get(k) == v for k, v in accuracy_common.items())}
                for p in ("auto", "fp32")}
    seeds = sorted(set(accuracy["auto"]) & set(accuracy["fp32"]))
    deltas = [100 * (accuracy["auto"][s] - accuracy["fp32"][s]) for s in seeds]
    hf_best = max(("hf_fp32", "hf_bf16"), key=lambda s: best.get(s, 0))
    final = {
        "metric": "train_speed", "task": name,
        "ours_over_hf_best": round(best["ours"] / best[hf_best], 2),
        "ours_over_fp32": round(best["ours"] / best["ours_fp32"], 2),
        "accuracy_delta_points": round(statistics.mean(deltas), 2) if deltas else None,
        "hf_best": hf_best, "best_examples_per_s": {s: round(v, 2) for s, v in best.items()},
        "median_ratio_over_fp32": round(statistics.median(speed["ours"]) / statistics.median(speed["ours_fp32"]), 2),
        "accuracy_delta_per_seed": [round(d, 2) for d in deltas],
        "accuracy_bf16": [accuracy["auto"][s] for s in seeds], "accuracy_fp32": [accuracy["fp32"][s] for s in seeds],
        "repeats": args.repeats, "targets": TARGETS, **common,
    }
    final["met"] = {
        "ours_over_hf_best": final["ours_over_hf_best"] >= TARGETS["ours_over_hf_best"],
        "ours_over_fp32": final["ours_over_fp32"] >= TARGETS["ours_over_fp32"],
        "accuracy_delta_points": deltas != [] and abs(final["accuracy_delta_points"]) <= TARGETS[
            "accuracy_delta_points"]}
    log.write(final)
    extracted = {p: max(r["examples_per_s"] for r in log.rows if r.get("kind") == "extraction"
                        and r["precision"] == p and all(r.get(k) == v for k, v in common.items()))
                 for p in ("auto", "fp32")}
    ratio = round(extracted["auto"] / extracted["fp32"], 2)
    log.write({"metric": "extraction_speed", "task": name, "ours_over_fp32": ratio, "target": 3.0,
               "met": ratio >= 3.0, "best_examples_per_s": {p: round(v, 1) for p, v in extracted.items()},
               "batch_size": 64, **{k: v for k, v in common.items() if k != "batch_size"}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="*", default=list(LENGTHS), help="none: only the matrix-product rates")
    p.add_argument("--max-length", type=int, default=None, help="default: 64 for movie_sentiment, 256 for bbc_topic")
    p.add_argument("--speed-examples", type=int, default=640, help="examples of each timed epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the GPU check runs it on cuda)")
    p.add_argument("--repeats", type=int, default=3, help="alternate the systems this many times (best counts)")
    p.add_argument("--accuracy-examples", type=int, default=2000, help="training examples of the accuracy finetunes")
    p.add_argument("--test-examples", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=2.0, help="epochs of the accuracy finetunes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=None, help="append lines here; lines already there are reused")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = Log(args.out)
    if args.device == "cpu":
        matmul_rates(log, args.threads, args.repeats)
    for name in args.tasks:
        measure_task(name, args, log)


if __name__ == "__main__":
    main()
