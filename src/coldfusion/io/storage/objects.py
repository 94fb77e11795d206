"""Content-addressed files: every name is its content's SHA-256 (plus a suffix), so a file,
once written, never changes, and writing it twice is harmless.

`LocalObjects` keeps them in a directory. `S3Objects` keeps them in an S3 bucket (any
S3-compatible server) and uses the same directory as a cache: a file is read where it
lies locally, and fetched (checked against its name) the first time it is needed.
Writes go to the bucket before any index row names them, as local writes go to disk.
"""

import functools
import logging
import os
import tempfile
from pathlib import Path

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import FILE_MODE, atomic_write_bytes
from coldfusion.io.model_files import sha256_file

log = logging.getLogger("coldfusion.repository")


def checksum_of(name: str) -> str:
    """The SHA-256 a stored file's name says its content has."""
    return name.split(".", 1)[0]


def modified(path: Path) -> float | None:
    """When `path` was last written; None if it is gone (another process removed it)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


class LocalObjects:
    """Files named by content in `directory`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.directory)

    def local(self, name: str) -> Path:
        return self.directory / name

    def fetch(self, name: str) -> Path:
        """The local path of `name` (it may not exist: callers say what is missing)."""
        return self.local(name)

    def put(self, name: str, data: bytes) -> None:
        if not self.local(name).exists():
            atomic_write_bytes(self.local(name), data)

    def put_file(self, name: str, path: Path) -> None:
        """Store the file at `path` (this process's own, e.g. an upload it received) under
        `name` by moving it: made durable (fsync), then renamed into place, never rewritten.
        `path` is gone afterwards."""
        target = self.local(name)
        if target.exists():
            Path(path).unlink(missing_ok=True)
            return
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(path, FILE_MODE)
        try:
            os.replace(path, target)
        except OSError:  # another file system: copied (atomically), then the original removed
            atomic_write_bytes(target, Path(path).read_bytes())
            Path(path).unlink(missing_ok=True)

    def names(self) -> dict[str, float]:
        """What is stored (temporary files of interrupted writes excluded), with when each
        was last written (seconds since the epoch)."""
        return {p.name: t for p in self.directory.iterdir() if not p.name.startswith(".")
                if (t := modified(p)) is not None}

    def temporaries(self) -> list[Path]:
        """What interrupted writes left behind."""
        return [p for p in self.directory.iterdir() if p.name.startswith(".")]

    def stored(self, name: str) -> bool:
        return self.local(name).exists()

    def remove(self, name: str) -> None:
        self.local(name).unlink(missing_ok=True)


@functools.cache
def _client(endpoint: str | None, region: str):
    """One S3 client per server and process (clients are thread-safe, and slow to make: a
    repository is opened for every request). Keys come from boto3's usual sources."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name=region,
                        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=30,
                                      read_timeout=120))


class S3Objects(LocalObjects):
    """Files named by content under `prefix` in an S3 bucket; `directory` caches them."""

    def __init__(self, directory: Path, bucket: str, prefix: str, endpoint: str | None, region: str):
        super().__init__(directory)
        self.bucket, self.prefix = bucket, prefix
        self.client = _client(endpoint, region)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _errors(self, doing: str):
        from botocore.exceptions import BotoCoreError, ClientError

        def wrap(exc: Exception) -> ColdFusionError:
            return ColdFusionError(f"object store {self}: {doing} failed: {exc} (is the server reachable, "
                                   "and are AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY set?)")
        return (BotoCoreError, ClientError), wrap

    def _missing(self, exc) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey")

    def stored(self, name: str) -> bool:
        errors, wrap = self._errors(f"looking up {name}")
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + name)
            return True
        except errors as exc:
            if self._missing(exc):
                return False
            raise wrap(exc) from None

    def fetch(self, name: str) -> Path:
        """The cached copy of `name`, fetched first if need be. An object that is not in the
        bucket, or does not match its name, is not cached: the returned path does not exist."""
        path = self.local(name)
        if path.exists():
            return path
        errors, wrap = self._errors(f"reading {name}")
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                self.client.download_fileobj(self.bucket, self.prefix + name, f)
            if sha256_file(Path(tmp)) != checksum_of(name):
                log.warning("%s/%s does not match its checksum; not cached", self, name)
                return path
            os.replace(tmp, path)
        except errors as exc:
            if not self._missing(exc):
                raise wrap(exc) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def put(self, name: str, data: bytes) -> None:
        super().put(name, data)  # the cache: what this replica writes, it reads next
        if self.stored(name):
            return
        errors, wrap = self._errors(f"writing {name}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)
        except errors as exc:
            raise wrap(exc) from None

    def put_file(self, name: str, path: Path) -> None:
        super().put_file(name, path)  # into the cache, then from there to the bucket
        if self.stored(name):
            return
        errors, wrap = self._errors(f"writing {name}")
        try:
            self.client.upload_file(str(self.local(name)), self.bucket, self.prefix + name)
        except errors as exc:
            raise wrap(exc) from None

    def names(self) -> dict[str, float]:
        errors, wrap = self._errors("listing")
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            return {o["Key"][len(self.prefix):]: o["LastModified"].timestamp()
                    for page in pages for o in page.get("Contents", []) if "/" not in o["Key"][len(self.prefix):]}
        except errors as exc:
            raise wrap(exc) from None

    def remove(self, name: str) -> None:
        super().remove(name)
        errors, wrap = self._errors(f"deleting {name}")
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)
        except errors as exc:
            raise wrap(exc) from None

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        errors, wrap = self._errors(f"creating bucket {self.bucket}")
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except errors as exc:
            if not self._missing(exc) and "NoSuchBucket" not in str(exc):
                raise wrap(exc) from None
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except errors as exc2:
                if "BucketAlreadyOwnedByYou" not in str(exc2):
                    raise wrap(exc2) from None
