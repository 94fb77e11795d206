"""`ColdFusionStrategy`: Flower's FedAvg with its aggregation replaced by ColD Fusion's.

Sampling, messages and error handling are FedAvg's. Aggregation fuses the contributors'
bodies with any of our operators (`method`, `params`; the task-vector ones relative to
the base that was sent, the statistics ones with the Fisher / Gram records the
ClientApps attach). Only bodies are fused: heads never leave the nodes. The loop's
FlowerEngine uses its pieces and lets the repository fuse (so that contributions are
stored with their lineage); `strategy.start(...)` works too, for users of plain Flower.
"""

import tempfile
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coldfusion.checkpoint import save_tensors
from coldfusion.collab.contributor import ContributionResult
from coldfusion.collab.flower.messages import from_record, read_contribution, to_record
from coldfusion.fusion import fuse_files, get_operator


class ColdFusionStrategy(FedAvg):
    def __init__(self, method: str = "average", params: dict | None = None, min_contributors: int = 1, **fedavg):
        super().__init__(min_train_nodes=min_contributors, min_available_nodes=min_contributors,
                         fraction_evaluate=0.0, **fedavg)  # evaluation is the repository's linear probes
        self.operator, self.params = get_operator(method), get_operator(method).check_params(params or {})
        self.min_contributors = min_contributors
        self.targets: list[int] | None = None  # nodes to train this round (default: FedAvg's sample)
        self._base: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._base = arrays  # task-vector operators fuse relative to the body that was sent
        if self.targets is None:
            return super().configure_train(server_round, arrays, config, grid)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, list(self.targets), MessageType.TRAIN)

    def contributions(self, replies: Iterable[Message]) -> tuple[dict[int, ContributionResult], dict[int, str]]:
        """The contributions in the replies, and why the others failed, by node id."""
        results, failures = {}, {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failures[node] = msg.error.reason
                log(WARNING, "node %d sent no contribution: %s", node, msg.error.reason)
            else:
                results[node] = read_contribution(msg.content)
        return results, failures

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        results, _ = self.contributions(replies)
        if len(results) < self.min_contributors:
            log(WARNING, "round %d: %d contributions, fewer than the minimum %d; nothing fused",
                server_round, len(results), self.min_contributors)
            return None, None
        ordered = [results[n] for n in sorted(results)]
        fused = self.fuse(ordered, from_record(self._base) if self._base is not None else None)
        log(INFO, "round %d: fused %d bodies with '%s'", server_round, len(ordered), self.operator.name)
        return to_record(fused), MetricRecord({"contributors": len(ordered),
                                               "num-examples": sum(r.num_examples for r in ordered)})

    def fuse(self, results: list[ContributionResult], base: dict | None) -> dict:
        """Fuse the contributed bodies in memory (streamed through temporary safetensors files)."""
        op = self.operator
        with tempfile.TemporaryDirectory(prefix="coldfusion-fuse-") as tmp:
            def saved(name: str, tensors: dict) -> Path:
                save_tensors(Path(tmp) / f"{name}.safetensors", tensors)
                return Path(tmp) / f"{name}.safetensors"

            bodies = [saved(f"body{i}", r.body) for i, r in enumerate(results)]
            stats = [saved(f"stats{i}", r.stats[op.needs_stats]) for i, r in enumerate(results)] \
                if op.needs_stats else None
            weights = [r.num_examples for r in results] if op.weighting == "examples" else None
            return fuse_files(bodies, op.name, weights, base=saved("base", base) if op.needs_base else None,
                              stats=stats, **self.params)
