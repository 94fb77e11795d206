"""Asynchronous fusion: the service fuses what waits as soon as the policy says so.

Contributions arrive whenever their contributors finish, each against the base it was
trained from; a fusion takes every waiting one onto the newest version (the repository
rebases the stale ones, or refuses them, as `validation.stale` says). One fusion at a
time per process; across replicas (shared storage) the index refuses to fuse a contribution
twice or onto a base that is no longer the newest: the second fusion fails, nothing of it
is kept, and the next poll fuses what is left onto the new base.
"""

import logging
import threading
from datetime import UTC, datetime

from coldfusion.infra.errors import ColdFusionError
from coldfusion.repository import Repository, Version
from coldfusion.service.settings import FusionPolicy, SuiteSettings
from coldfusion.service.suite import OperatorSuite, judged, published_latest

log = logging.getLogger("coldfusion.service")


def due(policy: FusionPolicy, waiting: int, oldest_age_seconds: float) -> bool:
    """Whether `waiting` contributions, the oldest this old, are to be fused now."""
    return waiting >= policy.when_waiting or (waiting >= policy.at_least and oldest_age_seconds >= policy.after_seconds)


def fuse_if_due(repo: Repository, policy: FusionPolicy, now: datetime | None = None,
                onto: Version | None = None) -> Version | None:
    """Fuse every waiting contribution onto `onto` (default: the newest version) if the policy
    says it is time."""
    waiting = repo.uploads_waiting()
    if not waiting:
        return None
    now = now or datetime.now(UTC)
    oldest = min(datetime.fromisoformat(c.created) for c in waiting)
    if not due(policy, len(waiting), (now - oldest).total_seconds()):
        return None
    return repo.fuse((onto or repo.latest()).id, [c.id for c in waiting], method=policy.method, params=policy.params,
                     validation=policy.validation, outer=policy.outer, onto_newest=True)


class Fuser:
    """A background thread that applies `fuse_if_due` every `poll_seconds`, and with an
    operator's suite, rules on each fused base before anything is fused onto it."""

    def __init__(self, root, policy: FusionPolicy, suite: SuiteSettings | None = None):
        self.root, self.policy = root, policy
        self.suite = OperatorSuite(suite) if suite is not None else None
        self.lock = threading.Lock()  # one fusion at a time in this process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coldfusion-fuser", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def tick(self) -> Version | None:
        with self.lock:
            repo = Repository(self.root, create=False)
            try:
                self.rule_on_pending(repo)  # a verdict a crash cut off comes first
                version = fuse_if_due(repo, self.policy, onto=published_latest(repo, self.suite is not None))
                if version is not None:
                    self.rule_on_pending(repo)
                    version = repo.version(version.id)
            except ColdFusionError as exc:  # refusals are recorded in the index; the service goes on
                log.warning("fusion: %s", exc)
                return None
        if version is not None:
            fusion = version.fusion or {}
            log.info("fused contributions %s into version %s (refused: %s)", fusion.get("contributions"),
                     version.id, sorted(fusion.get("rejected", {})))
        return version

    def rule_on_pending(self, repo: Repository) -> None:
        """Score every fused base not yet ruled on; hold back the harmful ones."""
        if self.suite is None:
            return
        for version in repo.versions():
            if version.live and not judged(repo, version):
                reason = self.suite.judge(repo, version)
                if reason:
                    log.warning("version %s held back: %s", version.id, reason)

    def _run(self) -> None:
        while not self._stop.wait(self.policy.poll_seconds):
            try:
                self.tick()
            except Exception:  # a fault in one fusion must not stop every later one; it is logged whole
                log.exception("fusion failed; retrying at the next poll")
