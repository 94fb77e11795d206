"""ROOT/storage.json: the shared index and object store of a repository, if it has them.

    {"index": "postgresql://coldfusion@db.example:5432/coldfusion",
     "objects": "s3://bucket/prefix", "s3_endpoint": "http://127.0.0.1:8333"}

Secrets are not kept in it (it is a file anyone with the directory can read): the database
password comes from PGPASSWORD or ~/.pgpass as for every libpq client, the S3 keys from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or any source boto3 reads.
"""

import json
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from coldfusion.infra.errors import ColdFusionError

FILE = "storage.json"


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str | None = None  # postgresql://user@host:port/database (None: ROOT/index.sqlite)
    objects: str | None = None  # s3://bucket/prefix (None: ROOT/objects and ROOT/files)
    s3_endpoint: str | None = None  # an S3-compatible server's URL (None: AWS, or AWS_ENDPOINT_URL)
    s3_region: str = "us-east-1"

    @field_validator("index")
    @classmethod
    def _postgres(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"'{url}' is not a postgresql:// URL")
        if parts.password:
            raise ValueError("the URL holds a password, which storage.json would keep in the clear: "
                             "give it in PGPASSWORD or ~/.pgpass instead")
        return url

    @field_validator("objects")
    @classmethod
    def _s3(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"'{url}' is not an s3://bucket/prefix URL")
        return url

    @property
    def bucket(self) -> str:
        return urlsplit(self.objects).netloc

    @property
    def prefix(self) -> str:
        path = urlsplit(self.objects).path.strip("/")
        return f"{path}/" if path else ""


def read_settings(root: Path) -> StorageSettings:
    """ROOT/storage.json, or the all-local default where there is none."""
    path = Path(root) / FILE
    if not path.exists():
        return StorageSettings()
    try:
        return StorageSettings.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        raise ColdFusionError(f"{path} is not valid storage settings: {exc}") from None


def write_settings(root: Path, settings: StorageSettings) -> Path:
    from coldfusion.io.checkpoint import atomic_write_bytes

    path = Path(root) / FILE
    atomic_write_bytes(path, (settings.model_dump_json(exclude_none=True, indent=2) + "\n").encode())
    return path
