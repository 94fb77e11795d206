"""`FlowerEngine`: the loop's engine on a Flower Grid. One loop iteration = one Flower
round of training, then a round of evaluation.

At start it asks every connected SuperNode which contributor it is (a `query` message),
so rounds address contributors by name. Each train message carries the base and the
consortium's settings only; each evaluate message the new base, to every contributor,
which scores it on its own task and answers with numbers. A chosen contributor that
sends nothing (its node died, failed, timed out, or could not load its task) is recorded
as missing with the reason; one that declines, as declined; the round is fused when at
least `flower.min_contributors` sent a contribution.
"""

import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coldfusion.collab.config import RunConfig
from coldfusion.collab.consortium import ConsortiumSettings
from coldfusion.collab.flower.messages import ARRAYS, CONFIG, consortium_record, read_scores, to_record
from coldfusion.collab.flower.strategy import ColdFusionStrategy
from coldfusion.collab.round import EvaluationRound, RoundResult
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors

NOT_CONNECTED = "its SuperNode is not connected"


class FlowerEngine:
    name = "flower"

    def __init__(self, grid: Grid, config: RunConfig, run_id: str, strategy: ColdFusionStrategy | None = None):
        self.grid, self.settings = grid, config.flower
        self.consortium = ConsortiumSettings.of_run(config, run_id)
        self.contributor_names = config.contributor_names
        self.minimum = self.settings.min_contributors or len(self.contributor_names)
        self.strategy = strategy or ColdFusionStrategy(config.fusion.method, config.fusion.params, self.minimum)
        self._foreign: set[int] = set()  # nodes that hold no contributor of this run
        self.problems: dict[str, str] = {}  # contributor -> why its node cannot take part (e.g. a bad task file)
        self.unidentified: dict[int, str] = {}  # node -> why it could not say which contributor it is
        self.nodes = self._discover()

    def _discover(self) -> dict[str, int]:
        """Contributor name -> node id, once all contributors (at least the minimum, after
        `discovery_timeout`) are connected."""
        deadline = time.monotonic() + self.settings.discovery_timeout
        while len(list(self.grid.get_node_ids())) < len(self.contributor_names) and time.monotonic() < deadline:
            time.sleep(1)
        known = self._identify(set(self.grid.get_node_ids()))
        usable = {n for n in known if n not in self.problems}
        if len(usable) < self.minimum:
            raise ColdFusionError(
                f"only {len(usable)} of the run's {len(self.contributor_names)} contributors have a working SuperNode "
                f"({sorted(usable) or 'none'}; {self._absence_notes() or 'no other node answered'}); the minimum is "
                f"{self.minimum} (flower.min_contributors). Start one SuperNode per contributor with --node-config "
                f"\"task='NAME_OR_SPEC.yaml'\"")
        return known

    def _identify(self, nodes: set[int]) -> dict[str, int]:
        """Ask these nodes which contributor they are (a `query` message that carries nothing)."""
        replies = self.grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in sorted(nodes)],
            timeout=self.settings.discovery_timeout)
        found: dict[str, int] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.unidentified[node] = reply.error.reason  # asked again at the next round
                continue
            self.unidentified.pop(node, None)
            answer = reply.content.config_records["contributor"]
            name = str(answer["name"])
            if name in found:
                raise ColdFusionError(f"two SuperNodes ({found[name]} and {node}) are contributor '{name}'; "
                                      f"give each SuperNode its own task")
            found[name] = node
            if "problem" in answer:
                self.problems[name] = str(answer["problem"])
            else:
                self.problems.pop(name, None)
        self._foreign |= {node for name, node in found.items() if name not in self.contributor_names}
        return {n: found[n] for n in self.contributor_names if n in found}

    def _refresh(self) -> None:
        """Forget contributors whose SuperNode left; identify nodes that joined (a restarted one)
        or that could not say who they are last time."""
        connected = set(self.grid.get_node_ids())
        self.nodes = {name: node for name, node in self.nodes.items() if node in connected}
        self.unidentified = {node: why for node, why in self.unidentified.items() if node in connected}
        joined = connected - set(self.nodes.values()) - self._foreign
        if joined:
            self.nodes.update({n: node for n, node in self._identify(joined).items() if n not in self.nodes})

    def _unidentified_note(self) -> str:
        if not self.unidentified:
            return ""
        return (f"{len(self.unidentified)} SuperNode(s) could not say which contributor they are: "
                + "; ".join(sorted(set(self.unidentified.values()))))

    def _absence_notes(self) -> str:
        notes = [f"{name}: {why}" for name, why in self.problems.items()]
        return "; ".join(notes + ([self._unidentified_note()] if self.unidentified else []))

    def _reachable(self, names: list[str]) -> tuple[dict[str, int], dict[str, str]]:
        """(name -> node) of those that can take part now, and why each other one cannot."""
        self._refresh()
        targets = {n: self.nodes[n] for n in names if n in self.nodes and n not in self.problems}
        not_connected = NOT_CONNECTED + (f" ({self._unidentified_note()})" if self.unidentified else "")
        missing = {n: self.problems.get(n) or not_connected for n in names if n not in targets}
        return targets, missing

    def _ask(self, targets: dict[str, int], messages, what: str) -> tuple[dict[int, Message], dict[str, str]]:
        started = time.monotonic()
        replies = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(messages,
                                                                               timeout=self.settings.round_timeout)}
        # Flower ends a round early when a node goes offline, without an error reply for it
        closed = f"no reply to the {what} message when the round closed, after {time.monotonic() - started:.0f} s"
        missing = {}
        for name, node in targets.items():
            if node not in replies:
                missing[name] = closed
            elif replies[node].has_error():
                missing[name] = replies[node].error.reason
        return replies, missing

    def run_round(self, base: Tensors, iteration: int, names: list[str], progress) -> RoundResult:
        targets, missing = self._reachable(names)
        progress.phase(f"iteration {iteration}: {len(targets)} contributors training on Flower", 0)
        self.strategy.targets = list(targets.values())
        messages = self.strategy.configure_train(iteration, to_record(base), consortium_record(self.consortium),
                                                 self.grid)
        replies, failed = self._ask(targets, messages, "train")
        missing.update(failed)
        results, declined, _ = self.strategy.contributions(replies.values())
        declined = {name: declined[node] for name, node in targets.items() if node in declined}
        if len(results) < min(self.minimum, len(names)):
            raise ColdFusionError(
                f"iteration {iteration}: {len(results)} of {len(names)} chosen contributors sent a contribution "
                f"(missing: {missing}; declined: {declined}); the minimum is {self.minimum} "
                f"(flower.min_contributors)")
        # in the order the loop chose them, as the local engine returns them
        return RoundResult([results[targets[n]] for n in names if n in targets and targets[n] in results],
                           missing, declined)

    def evaluate(self, body: Tensors, iteration: int, progress) -> EvaluationRound:
        """Every contributor scores `body` on its own task; numbers come back, nothing else."""
        targets, missing = self._reachable(self.contributor_names)
        progress.phase(f"iteration {iteration}: {len(targets)} contributors scoring the base on Flower", 0)
        content = RecordDict({ARRAYS: to_record(body), CONFIG: consortium_record(self.consortium, iteration)})
        messages = [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
                    for node in targets.values()]
        replies, failed = self._ask(targets, messages, "evaluate")
        missing.update(failed)
        scores = {}
        for name, node in targets.items():
            if name in missing:
                continue
            try:
                scores[name] = read_scores(replies[node].content)
            except (KeyError, ValueError, TypeError) as exc:
                missing[name] = f"its scores could not be read: {exc}"
        return EvaluationRound(scores, missing)
