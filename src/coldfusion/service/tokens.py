"""Per-contributor tokens, issued and revoked by the operator, stored hashed.

A token is 32 random bytes (URL-safe text) and identifies one contributor; the service
keeps only its SHA-256, so a copy of the service's files gives no one a usable token. A
plain hash suffices (no salt, no slow KDF): the secret has 256 bits of entropy, not a
password's. The store is an SQLite file beside the repository's index,
ROOT/service/service.sqlite, which also keeps the uploads the service refused before
storing anything (the contributor's history shows them with their reason).
"""

import hashlib
import secrets
import sqlite3
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from coldfusion.infra.names import check_name

PREFIX = "cf_"  # recognisable in logs and secret scanners


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ServiceStore:
    """Tokens and refused uploads of the service over the repository at `root`."""

    def __init__(self, root: Path):
        self.path = Path(root) / "service" / "service.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(
                "CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, contributor TEXT NOT NULL, "
                "created TEXT NOT NULL, revoked TEXT);"
                "CREATE INDEX IF NOT EXISTS tokens_by_contributor ON tokens (contributor);"
                "CREATE TABLE IF NOT EXISTS refusals (id INTEGER PRIMARY KEY, contributor TEXT NOT NULL, "
                "created TEXT NOT NULL, status INTEGER NOT NULL, reason TEXT NOT NULL);")

    @contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        try:
            with db:  # one transaction
                yield db
        finally:
            db.close()

    def issue(self, contributor: str) -> str:
        """A new token for `contributor` (shown once; earlier tokens stay valid until revoked)."""
        check_name(contributor, "contributor")
        token = PREFIX + secrets.token_urlsafe(32)
        with self._db() as db:
            db.execute("INSERT INTO tokens (hash, contributor, created) VALUES (?, ?, ?)",
                       (_hash(token), contributor, _now()))
        return token

    def revoke(self, contributor: str) -> int:
        """Revoke every live token of `contributor`; how many there were."""
        with self._db() as db:
            return db.execute("UPDATE tokens SET revoked = ? WHERE contributor = ? AND revoked IS NULL",
                              (_now(), contributor)).rowcount

    def contributor_of(self, token: str) -> str | None:
        """Who holds `token`, if it is live."""
        with self._db() as db:
            row = db.execute("SELECT contributor FROM tokens WHERE hash = ? AND revoked IS NULL",
                             (_hash(token),)).fetchone()
        return row["contributor"] if row else None

    def contributors(self) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT contributor, COUNT(*) AS tokens, SUM(revoked IS NULL) AS live, "
                              "MIN(created) AS since FROM tokens GROUP BY contributor ORDER BY contributor")
            return [dict(r) for r in rows]

    def refuse(self, contributor: str, status: int, reason: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO refusals (contributor, created, status, reason) VALUES (?, ?, ?, ?)",
                       (contributor, _now(), status, reason[:2000]))

    def refusals(self, contributor: str) -> list[dict]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT created, status, reason FROM refusals WHERE contributor = ? "
                                                "ORDER BY id", (contributor,))]
