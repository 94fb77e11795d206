"""Run configs: YAML validated by pydantic; every key has a default that works here.

Errors name the file and the offending key (`loop.iterations: ...`).
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from coldfusion.encodings import EncodingSettings
from coldfusion.infra.config_files import ConfigSection, load_config_file, validate_config
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.names import SafeName
from coldfusion.repository.outer import OuterSettings
from coldfusion.repository.validation import ValidationSettings
from coldfusion.tasks import TaskSpec
from coldfusion.training.settings import ExperimentSettings, FinetuneSettings, ProbeProtocol


class LoopSettings(ConfigSection):
    iterations: int = Field(3, ge=1)
    contributors_per_iteration: int | None = Field(
        None, ge=1, description="k contributors sampled per iteration; default: every seen task")
    examples_per_contributor: int | None = Field(
        640, ge=1, description="fresh training examples per contributor per iteration; null: whole train split")
    keep_head: bool = Field(True, description="contributors keep their head across iterations (else a fresh one)")
    validation_examples: int = Field(200, ge=1, description="validation examples for early stopping")


class EvaluationSettings(ProbeProtocol):
    every: int = Field(1, ge=1, description="score the base every this many iterations (and after the last); "
                                            "the probes of many seen tasks can cost more than the training")
    suite: list[TaskSpec] = Field(
        default_factory=list,
        description="the repository owner's own evaluation tasks (public benchmarks), scored on the server; "
                    "the contributors' tasks are scored by the contributors themselves")


class FusionSettings(ConfigSection):
    method: str = "average"
    params: dict = Field(default_factory=dict, description="operator parameters")
    statistics_examples: int = Field(
        128, ge=1, description="examples each contributor computes Fisher / Gram statistics on (fisher, regmean)")
    validation: ValidationSettings = Field(
        default_factory=ValidationSettings, description="checks every contribution must pass to be fused")
    outer: OuterSettings = Field(
        default_factory=OuterSettings, description="the outer optimizer's step on the fused update (DiLoCo: "
                                                   "{lr: 0.7, momentum: 0.9, nesterov: true}); default: plain fusion")


class FlowerSettings(ConfigSection):
    """How the loop runs on Flower (engine: flower)."""

    mode: Literal["simulation", "deployment"] = Field(
        "simulation", description="simulation: every contributor on this machine (Flower's simulation runtime); "
                                  "deployment: contributors are SuperNodes connected to a SuperLink")
    min_contributors: int | None = Field(
        None, ge=1, description="fuse a round when at least this many chosen contributors replied; "
                                "default: all of them")
    round_timeout: float = Field(3600, gt=0, description="seconds to wait for a round's replies")
    discovery_timeout: float = Field(600, gt=0, description="seconds to wait for the contributors' SuperNodes")
    client_cpus: int | None = Field(
        None, ge=1, description="simulation: CPUs per contributor (default: `threads`, so contributors train "
                                "one at a time on a machine of that many cores)")
    client_gpus: float | None = Field(
        None, gt=0, description="simulation on a machine with GPUs: the share of a GPU per contributor (default 1: "
                                "contributors take turns on each GPU; 0.25 lets four share one)")


class AttackSettings(ConfigSection):
    """Robustness experiments: poisoned contributors (see collab/attacks.py)."""

    contributors: list[str] = Field(min_length=1, description="the poisoned contributors (task names)")
    kind: Literal["scale", "sign_flip", "random"] = "scale"
    factor: float = Field(20.0, gt=0, description="how far the poisoned update goes, in units of the honest one")


class RunConfig(ExperimentSettings):
    """A run; its `device`, `precision` and `threads` are those of contributors on this machine (local
    engine, simulation) and of the server's own evaluation suite; a SuperNode chooses its own."""

    name: SafeName = "coldfusion"
    tasks: list[TaskSpec] = Field(
        default_factory=list, description="the seen tasks, one contributor each (local engine and simulation)")
    contributors: list[SafeName] = Field(
        default_factory=list, description="Flower deployment: the contributors' names; each SuperNode brings its "
                                          "own task (node config task=...), so the server holds no task data")
    engine: Literal["local", "flower"] = Field(
        "local", description="local: contributors train in this process; flower: on Flower (see `flower`)")
    flower: FlowerSettings = FlowerSettings()
    loop: LoopSettings = LoopSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    fusion: FusionSettings = FusionSettings()
    contribution: EncodingSettings = Field(
        default_factory=EncodingSettings, description="what contributors send: full body, delta, sparse or lora")
    output_dir: Path = Path("runs")
    repository: Path | None = Field(None, description="repository directory; default: <run dir>/repository")
    attack: AttackSettings | None = Field(
        None, description="robustness experiments only: these contributors send a poisoned update")

    @property
    def deployment(self) -> bool:
        return self.engine == "flower" and self.flower.mode == "deployment"

    @property
    def contributor_names(self) -> list[str]:
        return self.contributors if self.deployment else [t.name for t in self.tasks]

    @model_validator(mode="after")
    def _contributors_or_tasks(self):
        if self.deployment:
            if self.tasks:
                raise ValueError(
                    "a Flower deployment's server config names its contributors, not their data: replace `tasks:` "
                    "by `contributors: [NAME, ...]` and give each SuperNode its own task (node config "
                    "task='TASK.yaml'); `coldfusion flower local` splits a one-file config for you")
            if not self.contributors:
                raise ValueError("a Flower deployment needs `contributors: [NAME, ...]` (one per SuperNode)")
        elif self.contributors:
            raise ValueError("`contributors` names the SuperNodes of a Flower deployment (flower.mode: deployment); "
                             "here list the seen tasks under `tasks:`")
        elif not self.tasks:
            raise ValueError("`tasks` needs at least one task (one contributor each)")
        names = self.contributor_names + [t.name for t in self.evaluation.suite]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"names must be unique across contributors and evaluation.suite: {repeated} repeat")
        return self

    @model_validator(mode="after")
    def _attackers_are_contributors(self):
        if self.attack:
            unknown = sorted(set(self.attack.contributors) - set(self.contributor_names))
            if unknown:
                raise ValueError(f"attack.contributors {unknown} are not among the contributors "
                                 f"{self.contributor_names}")
            if self.contribution.kind != "full":
                raise ValueError("attack: poisoned updates are simulated on full bodies; "
                                 f"use contribution.kind: full, not {self.contribution.kind}")
        return self


def parse_config(data: dict, source: str = "<config>") -> RunConfig:
    return validate_config(RunConfig, data, source)


def load_config(path: Path) -> RunConfig:
    config = load_config_file(path, RunConfig)
    from coldfusion.fusion import get_operator  # unknown methods fail now, not after an hour of training

    try:
        get_operator(config.fusion.method).check_params(config.fusion.params)
    except ColdFusionError as exc:
        raise ColdFusionError(f"{path}: 'fusion': {exc}") from None
    return config


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=False), sort_keys=False)
