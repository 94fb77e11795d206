"""`coldfusion contribute-loop URL TASK.yaml`: a contributor that keeps going on its own.

A short driver of the one contributor (coldfusion.contributors): each round it pulls the
newest published base, lets the contributor finetune it on its private task (fresh examples
each round, its head kept across rounds and restarts under WORKDIR/heads/), pushes what the
contributor sends (the body, a delta, a sparse delta, a FISH-masked update or LoRA factors,
as `contribution` says), and waits for a newer base than the one it trained from (or goes
on at once, `wait_for_new_base: false`), unless its contribution was refused (then no newer
base may come of it: it trains again). Its data, labels, head and settings never leave this
process; only the payload and the example count are sent.
"""

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from coldfusion.contributors.contributor import Contributor
from coldfusion.contributors.heads import HeadStore
from coldfusion.encodings import EncodingSettings
from coldfusion.infra.config_files import load_config_file
from coldfusion.infra.names import check_name
from coldfusion.infra.runtime import use_compute
from coldfusion.io.checkpoint import load_tensors, save_tensors
from coldfusion.models.encoder import Encoder
from coldfusion.service.client import ServiceClient
from coldfusion.tasks import TaskSpec, load_task
from coldfusion.training import FinetuneSettings
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
        default_factory=EncodingSettings, description="what is sent: full, delta, sparse (by magnitude, or a FISH "
                                                      "mask with score: fisher) or lora")
    fisher_examples: int = Field(128, ge=1, description="examples a FISH mask's Fisher is measured on")
    seed: int = 0


def load_contribute_loop_config(path: Path) -> ContributeLoopConfig:
    return load_config_file(path, ContributeLoopConfig)


def contribute_loop(client: ServiceClient, config: ContributeLoopConfig, workdir: Path,
                    on_round: Callable[[dict], None] | None = None, stop: Callable[[], bool] = lambda: False) -> int:
    """Run the rounds; returns how many were pushed. `workdir` holds the model's files and the heads."""
    compute = use_compute(config)
    task = load_task(config.task)
    model_dir = Path(workdir) / "model"
    if not model_dir.exists():  # the architecture and tokenizer, once (any version has them)
        client.pull("latest", model_dir)
    heads = HeadStore(Path(workdir) / "heads" / check_name(task.name, "task"))
    contributor = Contributor(
        task, Encoder.load(str(model_dir)), finetune_settings=config.finetune, max_length=config.max_length,
        pooling=config.pooling, examples_per_iteration=config.examples_per_round,
        validation_examples=config.validation_examples, keep_head=True, seed=config.seed,
        statistics_examples=config.fisher_examples, encoding=config.contribution, head_store=heads,
        device=compute.device, compute_dtype=compute.dtype)
    last_base, last_sent, pushed, round_ = None, None, 0, heads.next_round()  # a restart takes up its count
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
        with tempfile.TemporaryDirectory() as scratch:
            client.pull_body(str(latest["id"]), Path(scratch) / "base.safetensors")
            sent = contributor.contribute(load_tensors(Path(scratch) / "base.safetensors"), round_)
            save_tensors(Path(scratch) / "payload.safetensors", sent.body)
            reply = client.upload(Path(scratch) / "payload.safetensors", who, latest["id"], task.name,
                                  sent.num_examples, sent.encoding)
        last_base, last_sent, pushed, round_ = latest["id"], reply["id"], pushed + 1, round_ + 1
        record = {"round": round_, "base": latest["id"], "contribution": reply["id"], **sent.metrics}
        log.info("round %d: trained on version %d, sent contribution %d", round_, latest["id"], reply["id"])
        if on_round is not None:
            on_round(record)
    return pushed
