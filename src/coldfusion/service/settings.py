"""What the operator sets for `coldfusion serve` (a YAML file; every key has a default)."""

from pathlib import Path

from pydantic import Field

from coldfusion.infra.config_files import ConfigSection, load_config_file
from coldfusion.repository.outer import OuterSettings
from coldfusion.repository.validation import ValidationSettings
from coldfusion.tasks.spec import TaskSpec
from coldfusion.training.settings import EncoderSettings, ProbeProtocol


class FusionPolicy(ConfigSection):
    """When the service fuses what is waiting: as soon as `when_waiting` contributions have
    arrived, or `after_seconds` after the oldest arrived if at least `at_least` are there."""

    enabled: bool = Field(True, description="false: only store contributions (fuse with `coldfusion fuse`)")
    when_waiting: int = Field(4, ge=1, description="fuse as soon as this many contributions wait (k)")
    after_seconds: float = Field(600.0, gt=0, description="or once the oldest has waited this long (T) ...")
    at_least: int = Field(1, ge=1, description="... if at least this many wait (m)")
    method: str = Field("average", description="fusion operator (the README's list)")
    params: dict = Field(default_factory=dict, description="the operator's parameters")
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    outer: OuterSettings | None = Field(None, description="outer optimizer on base - fused (null: plain fusion)")
    poll_seconds: float = Field(1.0, gt=0, description="how often the service looks at what waits")


class SuiteSettings(EncoderSettings):
    """The operator's evaluation suite (service/suite.py): a fused base scoring worse than the
    one it was fused onto by more than `margin` is held back, not published."""

    tasks: list[TaskSpec] = Field(..., min_length=1, description="public tasks the operator scores every base on")
    margin: float = Field(0.5, ge=0, description="hold back a base more than this many accuracy points below the "
                                                 "one it was fused onto (mean over the tasks)")
    evaluation: ProbeProtocol = Field(default_factory=ProbeProtocol)


class ServiceSettings(ConfigSection):
    max_upload_mb: float = Field(512.0, gt=0, description="larger uploads are refused (413) as they stream in")
    read_timeout_seconds: float = Field(
        30.0, gt=0, description="an upload that sends nothing for this long is dropped (408)")
    fusion: FusionPolicy = Field(default_factory=FusionPolicy)
    suite: SuiteSettings | None = Field(None, description="the operator's evaluation suite (null: publish every "
                                                          "fused base)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def load_service_settings(path: Path | None) -> ServiceSettings:
    return load_config_file(path, ServiceSettings) if path else ServiceSettings()
