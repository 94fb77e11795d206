"""`coldfusion contribute-loop URL TASK.yaml`: a contributor that keeps going on its own.

Each round it pulls the newest published base, finetunes it on its private task (fresh
examples each round, its head kept across rounds), pushes the body, and waits for a newer
base than the one it trained from (or goes on at once, `wait_for_new_base: false`), unless
its contribution was refused (then no newer base may come of it: it trains again). Its data,
labels, head and settings never leave this process; only the body (or its delta, as
`contribution` says) and the example count are sent.
"""

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator

from coldfusion.encodings import EncodingSettings, encode_contribution
from coldfusion.infra.config_files import load_config_file
from coldfusion.infra.runtime import derive_seed, use_compute
from coldfusion.io.checkpoint import load_tensors, save_tensors
from coldfusion.models.encoder import Classifier, Encoder, body_tensors
from coldfusion.service.client import ServiceClient
from coldfusion.tasks import TaskSpec, load_task
from coldfusion.training import FinetuneSettings, encode
from coldfusion.training.finetune import finetune
from coldfusion.training.settings import EncoderSettings

log = logging.getLogger("coldfusion.contributor")


class ContributeLoopConfig(EncoderSettings):
    task: TaskSpec = Field(..., description="the private task: a built-in name or a spec (path, hf_dataset, ...)")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    examples_per_round: int | None = Field(640, ge=1, description="fresh training examples per round; null: all")
    validation_examples: int = Field(200, ge=1, description="validation examples for early stopping")
    rounds: int | None = Field(None, ge=1, description="rounds to contribute; null: until stopped")
    wait_for_new_base: bool = Field(True, description="after a push, wait for a base newer than the one trained on")
    poll_seconds: float = Field(10.0, gt=0, description="how often to ask for a newer base")
    contribution: EncodingSettings = Field(
        default_factory=EncodingSettings, description="what is sent: full, delta or sparse (by magnitude)")
    seed: int = 0

    @field_validator("contribution")
    @classmethod
    def _encodable(cls, value: EncodingSettings) -> EncodingSettings:
        if value.kind == "lora" or (value.kind == "sparse" and value.score == "fisher"):
            raise ValueError("contribute-loop sends full, delta or sparse (score: magnitude) contributions")
        return value


def load_contribute_loop_config(path: Path) -> ContributeLoopConfig:
    return load_config_file(path, ContributeLoopConfig)


def contribute_loop(client: ServiceClient, config: ContributeLoopConfig, workdir: Path,
                    on_round: Callable[[dict], None] | None = None, stop: Callable[[], bool] = lambda: False) -> int:
    """Run the rounds; returns how many were pushed. `workdir` holds the model's files."""
    compute = use_compute(config)
    task = load_task(config.task)
    model_dir = Path(workdir) / "model"
    if not model_dir.exists():  # the architecture and tokenizer, once (any version has them)
        client.pull("latest", model_dir)
    encoder = Encoder.load(str(model_dir))
    train = encode(task.train, encoder.tokenizer, config.max_length)
    validation = encode(task.validation.head(config.validation_examples), encoder.tokenizer, config.max_length)
    order = np.random.RandomState(derive_seed(config.seed, "data", task.name)).permutation(len(train))
    n = min(config.examples_per_round or len(order), len(order))
    head, last_base, last_sent, pushed, round_ = None, None, None, 0, 0
    who = client.me()
    while (config.rounds is None or pushed < config.rounds) and not stop():
        latest = client.version("latest")
        if config.wait_for_new_base and last_base is not None and latest["id"] <= last_base:
            outcome = client.outcome(who, last_sent)
            if outcome["status"] in ("waiting", "fused"):  # a newer base is coming (a held-back fusion requeues)
                time.sleep(config.poll_seconds)
                continue
            log.info("contribution %d was %s (%s); training again on version %d", last_sent, outcome["status"],
                     outcome["reason"], latest["id"])
            last_base = None
        with tempfile.TemporaryDirectory() as scratch:
            body_file = Path(scratch) / "base.safetensors"
            client.pull_body(str(latest["id"]), body_file)
            base = load_tensors(body_file)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(config.seed, "head", task.name, round_))
                model = Classifier(encoder.new_body(base), task.num_labels, pooling=config.pooling)
            if head is not None:
                model.head.load_state_dict(head)
            model.place(compute.device, compute.dtype)
            rows = np.take(order, range(round_ * n, round_ * n + n), mode="wrap")
            result = finetune(model, train.take(rows), validation, config.finetune,
                              seed=derive_seed(config.seed, "finetune", task.name, round_))
            head = {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}
            payload = encode_contribution(body_tensors(model.body), base, config.contribution)
            save_tensors(Path(scratch) / "payload.safetensors", payload)
            reply = client.upload(Path(scratch) / "payload.safetensors", who, latest["id"], task.name, len(rows),
                                  config.contribution.record())
        last_base, last_sent, pushed, round_ = latest["id"], reply["id"], pushed + 1, round_ + 1
        record = {"round": round_, "base": latest["id"], "contribution": reply["id"], **result.summary()}
        log.info("round %d: trained on version %d, sent contribution %d", round_, latest["id"], reply["id"])
        if on_round is not None:
            on_round(record)
    return pushed

