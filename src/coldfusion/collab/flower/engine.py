"""`FlowerEngine`: the loop's engine on a Flower Grid. One loop iteration = one Flower round.

At start it asks every connected SuperNode which contributor it is (a `query` message),
so rounds address contributors by name. A chosen contributor that sends nothing (its
node died, failed or timed out) is recorded as missing with the reason; the round is
fused when at least `flower.min_contributors` replied.
"""

import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coldfusion.checkpoint import Tensors
from coldfusion.collab.flower.messages import CONFIG, settings_record, to_record
from coldfusion.collab.flower.strategy import ColdFusionStrategy
from coldfusion.collab.round import RoundResult
from coldfusion.config import RunConfig
from coldfusion.errors import ColdFusionError


class FlowerEngine:
    name = "flower"

    def __init__(self, grid: Grid, config: RunConfig, strategy: ColdFusionStrategy | None = None):
        self.grid, self.config, self.settings = grid, config, config.flower
        self.contributor_names = [t.name for t in config.tasks]
        self.minimum = self.settings.min_contributors or len(self.contributor_names)
        self.strategy = strategy or ColdFusionStrategy(config.fusion.method, config.fusion.params, self.minimum)
        self._foreign: set[int] = set()  # nodes that hold no task of this run
        self.nodes = self._discover()

    def _discover(self) -> dict[str, int]:
        """Contributor name -> node id, once all contributors (at least the minimum, after
        `discovery_timeout`) are connected."""
        deadline = time.monotonic() + self.settings.discovery_timeout
        while len(list(self.grid.get_node_ids())) < len(self.contributor_names) and time.monotonic() < deadline:
            time.sleep(1)
        known = self._identify(set(self.grid.get_node_ids()))
        if len(known) < self.minimum:
            raise ColdFusionError(
                f"only {len(known)} of the run's {len(self.contributor_names)} contributors have a SuperNode "
                f"({sorted(known) or 'none'}); the minimum is {self.minimum} (flower.min_contributors). Start one "
                f"SuperNode per task with --node-config \"task='NAME_OR_SPEC.yaml'\"")
        return known

    def _identify(self, nodes: set[int]) -> dict[str, int]:
        """Ask these nodes which contributor they are (a `query` message)."""
        content = RecordDict({CONFIG: settings_record(self.config)})
        replies = self.grid.send_and_receive(
            [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in sorted(nodes)],
            timeout=self.settings.discovery_timeout)
        found: dict[str, int] = {}
        for reply in replies:
            if reply.has_error():
                continue  # asked again at the next round
            name, node = str(reply.content.config_records["contributor"]["name"]), reply.metadata.src_node_id
            if name in found:
                raise ColdFusionError(f"two SuperNodes ({found[name]} and {node}) hold the task '{name}'; "
                                      f"give each SuperNode its own task")
            found[name] = node
        self._foreign |= {node for name, node in found.items() if name not in self.contributor_names}
        return {n: found[n] for n in self.contributor_names if n in found}

    def _refresh(self) -> None:
        """Forget contributors whose SuperNode left; identify nodes that joined (a restarted one)."""
        connected = set(self.grid.get_node_ids())
        self.nodes = {name: node for name, node in self.nodes.items() if node in connected}
        joined = connected - set(self.nodes.values()) - self._foreign
        if joined:
            self.nodes.update({n: node for n, node in self._identify(joined).items() if n not in self.nodes})

    def run_round(self, base: Tensors, iteration: int, names: list[str], progress) -> RoundResult:
        self._refresh()
        targets = {n: self.nodes[n] for n in names if n in self.nodes}
        missing = {n: "its SuperNode is not connected" for n in names if n not in self.nodes}
        progress.phase(f"iteration {iteration}: {len(targets)} contributors training on Flower", 0)
        self.strategy.targets = list(targets.values())
        messages = self.strategy.configure_train(iteration, to_record(base), settings_record(self.config),
                                                 self.grid)
        started = time.monotonic()
        replies = self.grid.send_and_receive(messages, timeout=self.settings.round_timeout)
        results, failures = self.strategy.contributions(replies)
        # Flower ends a round early when a node goes offline, without an error reply for it
        closed = f"no reply when the round closed, after {time.monotonic() - started:.0f} s"
        for name, node in targets.items():
            if node not in results:
                missing[name] = failures.get(node, closed)
        if len(results) < min(self.minimum, len(names)):
            raise ColdFusionError(
                f"iteration {iteration}: {len(results)} of {len(names)} chosen contributors sent a contribution "
                f"(missing: {missing}); the minimum is {self.minimum} (flower.min_contributors)")
        # in the order the loop chose them, as the local engine returns them
        return RoundResult([results[targets[n]] for n in names if n in targets and targets[n] in results], missing)

    def save_heads(self, heads_dir) -> None:
        """Heads live in each SuperNode's state; the ServerApp never sees them."""
