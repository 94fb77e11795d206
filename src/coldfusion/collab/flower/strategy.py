"""`ColdFusionStrategy`: Flower's FedAvg with its aggregation replaced by ColD Fusion's.

Sampling, messages and error handling are FedAvg's. Aggregation fuses the contributors'
bodies with any of our operators (`method`, `params`; the task-vector ones relative to
the base that was sent, the statistics ones with the Fisher / Gram records the
ClientApps attach), after the same validation as the repository's (`validation`), then
the outer optimizer's step (`outer`; its momentum buffer lives in the strategy, one per
run, as the repository keeps one beside each version). Only bodies are fused: heads never
leave the nodes. The loop's FlowerEngine uses its pieces and lets the repository fuse (so
that contributions are stored with their lineage); `strategy.start(...)` works too, for
users of plain Flower.
"""

import tempfile
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coldfusion.collab.contributor import ContributionResult
from coldfusion.collab.flower.messages import from_record, read_contribution, read_declined, to_record
from coldfusion.fusion import get_operator
from coldfusion.repository import Repository
from coldfusion.repository.outer import OuterSettings, outer_step
from coldfusion.repository.validation import ValidationSettings


class ColdFusionStrategy(FedAvg):
    def __init__(self, method: str = "average", params: dict | None = None, min_contributors: int = 1,
                 validation: ValidationSettings | None = None, outer: OuterSettings | None = None, **fedavg):
        # Contributors score each base on their own task; the loop's FlowerEngine sends those
        # evaluate messages itself (to every contributor, not a sample).
        super().__init__(min_train_nodes=min_contributors, min_available_nodes=min_contributors,
                         fraction_evaluate=0.0, **fedavg)
        self.operator, self.params = get_operator(method), get_operator(method).check_params(params or {})
        self.validation = validation
        self.outer = outer or OuterSettings()
        self._momentum = None  # the outer optimizer's buffer: None until its first step
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

    def contributions(self, replies: Iterable[Message]
                      ) -> tuple[dict[int, ContributionResult], dict[int, str], dict[int, str]]:
        """By node id: the contributions in the replies, why some declined, why the others failed."""
        results, declined, failures = {}, {}, {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failures[node] = msg.error.reason
                log(WARNING, "node %d sent no contribution: %s", node, msg.error.reason)
            elif (why := read_declined(msg.content)) is not None:
                declined[node] = why
                log(INFO, "node %d declined the round: %s", node, why)
            else:
                results[node] = read_contribution(msg.content)
        return results, declined, failures

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        results, _, _ = self.contributions(replies)
        if len(results) < self.min_contributors:
            log(WARNING, "round %d: %d contributions, fewer than the minimum %d; nothing fused",
                server_round, len(results), self.min_contributors)
            return None, None
        ordered = [results[n] for n in sorted(results)]
        base = from_record(self._base)
        fused, refused = self.fuse(ordered, base)
        fused, self._momentum = outer_step(base, fused, self._momentum, self.outer)
        for name, why in refused.items():
            log(WARNING, "round %d: refused the contribution of %s: %s", server_round, name, why)
        log(INFO, "round %d: fused %d bodies with '%s'", server_round, len(ordered) - len(refused), self.operator.name)
        return to_record(fused), MetricRecord({"contributors": len(ordered) - len(refused), "refused": len(refused),
                                               "num-examples": sum(r.num_examples for r in ordered
                                                                   if r.contributor not in refused)})

    def fuse(self, results: list[ContributionResult], base: dict) -> tuple[dict, dict[str, str]]:
        """The fused body and the refused contributions (contributor -> reason), through a
        throwaway repository: the same validation and fusion as the loop's."""
        with tempfile.TemporaryDirectory(prefix="coldfusion-fuse-") as tmp:
            repo = Repository(Path(tmp))
            v = repo.add_version(base, model_source="flower")
            ids = {repo.add_contribution(r.body, base_version=v.id, contributor=r.contributor, task=r.task,
                                         num_examples=r.num_examples, stats=r.stats, encoding=r.encoding).id:
                   r.contributor
                   for r in results}
            fused = repo.fuse(v.id, list(ids), method=self.operator.name, params=self.params,
                              validation=self.validation)
            refused = {ids[int(c)]: why for c, why in fused.fusion.get("rejected", {}).items()}
            return repo.load_version(fused.id), refused
