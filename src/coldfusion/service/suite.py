"""The operator's own evaluation suite: a fused base is published only if it does not score
worse than the base it was fused onto by more than a margin (the publication's
"backtracking harmful updates"); otherwise it stays on record, held back, with the reason.

Each version is scored once (a linear probe per task: frozen body, logistic regression
chosen on the task's validation split, accuracy on its test split); the scores go into the
repository's metrics (run `operator-suite`), where the leaderboard reads them.
"""

import statistics

from coldfusion.infra.runtime import use_compute
from coldfusion.models.encoder import Encoder
from coldfusion.repository import Repository, Version
from coldfusion.service.settings import SuiteSettings
from coldfusion.tasks import load_task
from coldfusion.training.task_probe import TaskProbe

RUN = "operator-suite"
VERDICT = "publication"  # the metrics row (task) that records each version's verdict


class OperatorSuite:
    def __init__(self, settings: SuiteSettings):
        self.settings = settings
        self._tasks = None
        self._probes: dict[str, TaskProbe] = {}

    def scores(self, repo: Repository, version: Version) -> dict[str, float]:
        """Accuracy (points) per task, measured once per version."""
        done = {m["task"]: m["values"]["accuracy"] * 100 for m in repo.metrics(version.id)
                if m["run"] == RUN and m["protocol"] == "linear_probe"}
        if self._tasks is None:
            self._tasks = [load_task(t) for t in self.settings.tasks]
        missing = [t for t in self._tasks if t.name not in done]
        if missing:
            compute = use_compute(self.settings)
            encoder = Encoder.from_repository(repo, version)
            for task in missing:
                probe = self._probes.get(task.name)
                if probe is None:  # tokenized once (every version shares the architecture and tokenizer)
                    probe = self._probes[task.name] = TaskProbe(
                        task, encoder, self.settings.evaluation, self.settings.max_length, self.settings.pooling,
                        compute.device, compute.dtype)
                result = probe.score(repo.load(version.sha256))
                values = {k: v for k, v in result.items() if k != "test_correct"}
                if not repo.record_metrics(version.id, task.name, "linear_probe", values, run=RUN, once=True):
                    return self.scores(repo, version)  # another replica measured it first: its scores stand
                done[task.name] = values["accuracy"] * 100
        return {t.name: done[t.name] for t in self._tasks}

    def judge(self, repo: Repository, version: Version) -> str | None:
        """Rule on `version`: hold it back (returns why) or publish it (returns None). The
        verdict is recorded once: replicas that judge the same version at the same time read
        the same stored scores, so they agree, and only the first records its verdict. A
        harmful version is held back before its verdict is recorded, so a crash in between
        cannot leave it judged but in use."""
        parent = repo.version(version.parent)
        new, old = self.scores(repo, version), self.scores(repo, parent)
        mean_new, mean_old = statistics.fmean(new.values()), statistics.fmean(old.values())
        reason = None
        if mean_new < mean_old - self.settings.margin:
            reason = (f"scores {mean_new:.2f} on the operator's suite, {mean_old - mean_new:.2f} points below "
                      f"version {parent.id} ({mean_old:.2f}); the margin is {self.settings.margin:g}")
            repo.hold_back(version.id, reason)  # its contributions wait again (once) for the next fusion
        repo.record_metrics(version.id, VERDICT, "verdict", {"published": reason is None, "score": mean_new,
                                                              "parent": parent.id, "parent_score": mean_old},
                            run=RUN, once=True)
        return reason


def judged(repo: Repository, version: Version) -> bool:
    """Whether the suite has ruled on `version` (a root version needs no ruling)."""
    return version.parent is None or any(m["run"] == RUN and m["task"] == VERDICT for m in repo.metrics(version.id))


def published_latest(repo: Repository, suite_enabled: bool) -> Version:
    """The newest version in use: not abandoned or held back, and with a suite, ruled on."""
    if not suite_enabled:
        return repo.latest()
    for version in reversed(repo.versions()):
        if version.live and judged(repo, version):
            return version
    return repo.latest()  # none ruled on yet: the repository's own answer (and its error if empty)
