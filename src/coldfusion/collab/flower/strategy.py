"""`ColdFusionStrategy`: Flower's FedAvg with its aggregation replaced by ColD Fusion's.

Sampling, messages and error handling are FedAvg's. Aggregation examines each reply as the
repository's admission does (`intake.examine` under the same `validation` rules: format,
decoding, the body against the base that was sent, no-ops, the norm bounds over the norms
this strategy admitted before, duplicates, the example cap), then calls the repository's
own pure fusion (`fusion_pipeline.fuse_step`: any of our operators, `method` and `params`,
then the outer optimizer's step, `outer`, whose momentum buffer lives in the strategy, one
per run, as the repository keeps one beside each version). The same bodies give the same
bytes either way. Only bodies are fused: heads never leave the nodes. The loop's
FlowerEngine uses its pieces and lets the repository fuse (so that contributions are stored
with their lineage); `strategy.start(...)` works too, for users of plain Flower.
"""

import tempfile
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coldfusion.collab.flower.messages import from_record, read_contribution, read_declined, to_record
from coldfusion.contributors.contributor import ContributionResult
from coldfusion.fusion import get_operator
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import save_tensors, serialize, sha256_bytes
from coldfusion.repository.fusion_pipeline import fuse_step
from coldfusion.repository.intake import Refused, check_examples, examine
from coldfusion.repository.outer import OuterSettings
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
        self._norms: list[float] = []  # delta norms admitted so far, newest first (the norm rule's history)
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
        fused, refused = self.fuse(ordered, from_record(self._base))
        for name, why in refused.items():
            log(WARNING, "round %d: refused the contribution of %s: %s", server_round, name, why)
        if fused is None:
            log(WARNING, "round %d: %d contributions admitted, fewer than min_accepted; nothing fused", server_round,
                len(ordered) - len(refused))
            return None, None
        log(INFO, "round %d: fused %d bodies with '%s'", server_round, len(ordered) - len(refused), self.operator.name)
        return to_record(fused), MetricRecord({"contributors": len(ordered) - len(refused), "refused": len(refused),
                                               "num-examples": sum(r.num_examples for r in ordered
                                                                   if r.contributor not in refused)})

    def fuse(self, results: list[ContributionResult], base: dict) -> tuple[dict | None, dict[str, str]]:
        """The next base (None: fewer than `validation.min_accepted` were admitted) and the
        refused contributions (contributor -> reason, with the rule)."""
        rules = self.validation or ValidationSettings()
        refused, admitted, seen = {}, [], {}
        data_of_base = serialize(base)
        for r in results:
            data = serialize(r.body)
            sha = sha256_bytes(data)
            try:
                check_examples(r.num_examples, rules)
                if sha in seen:
                    raise Refused("duplicate", f"the same payload as {seen[sha]}'s")
                examined = examine(data, r.encoding, base, self._norms, rules)
            except Refused as exc:
                refused[r.contributor] = str(exc)
                continue
            seen[sha] = r.contributor
            self._norms.insert(0, examined.delta_norm)
            admitted.append((r, examined))
        if len(admitted) < rules.min_accepted:
            return None, refused
        op = self.operator
        with tempfile.TemporaryDirectory(prefix="coldfusion-fuse-") as tmp:
            scratch = Path(tmp)
            (scratch / "base.safetensors").write_bytes(data_of_base)
            bodies, stats = [], []
            for i, (r, examined) in enumerate(admitted):
                bodies.append(scratch / f"{i}.safetensors")
                save_tensors(bodies[-1], examined.body)
                if op.needs_stats:
                    if op.needs_stats not in r.stats:
                        raise ColdFusionError(f"fusion method '{op.name}' needs {op.needs_stats} statistics, which "
                                              f"{r.contributor} did not send")
                    stats.append(scratch / f"{i}.{op.needs_stats}.safetensors")
                    save_tensors(stats[-1], r.stats[op.needs_stats])
            fused, self._momentum = fuse_step(
                bodies, scratch / "base.safetensors", op.name, self.params,
                weights=[r.num_examples for r, _ in admitted] if op.weighting == "examples" else None,
                stats=stats or None, norms=[e.delta_norm for _, e in admitted], outer=self.outer,
                momentum=self._momentum, base_tensors=base)
        return fused, refused
