"""Per-contributor tokens, issued and revoked by the operator, stored hashed.

A token is 32 random bytes (URL-safe text) and identifies one contributor; the service
keeps only its SHA-256, so a copy of the service's files gives no one a usable token. A
plain hash suffices (no salt, no slow KDF): the secret has 256 bits of entropy, not a
password's. The store is an SQLite file beside the repository's index,
ROOT/service/service.sqlite, or with shared storage (storage.json) two tables in the
repository's PostgreSQL index, so that every replica knows every token. (Refused uploads
are the repository's: its index's `refusals` table, written by admission.)
"""

import hashlib
import secrets
from datetime import UTC, datetime
from pathlib import Path

from coldfusion.infra.names import check_name
from coldfusion.io.storage.index import PostgresIndex, SqliteIndex
from coldfusion.io.storage.settings import read_settings

PREFIX = "cf_"  # recognisable in logs and secret scanners
TABLES = """
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, contributor TEXT NOT NULL, created TEXT NOT NULL,
    revoked TEXT);
CREATE INDEX IF NOT EXISTS tokens_by_contributor ON tokens (contributor)
"""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ServiceStore:
    """Tokens and refused uploads of the service over the repository at `root`."""

    def __init__(self, root: Path):
        shared = read_settings(root).index
        if shared:
            self.index = PostgresIndex(shared)
            with self.index.transaction() as db:
                db.execute(TABLES)
        else:
            (Path(root) / "service").mkdir(parents=True, exist_ok=True)
            self.index = SqliteIndex(Path(root) / "service" / "service.sqlite")
            with self.index.transaction() as db:
                for statement in TABLES.split(";"):
                    if statement.strip():
                        db.execute(statement)

    def _db(self):
        return self.index.transaction()

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
        with self.index.transaction(read=True) as db:
            row = db.execute("SELECT contributor FROM tokens WHERE hash = ? AND revoked IS NULL",
                             (_hash(token),)).fetchone()
        return row["contributor"] if row else None

    def contributors(self) -> list[dict]:
        with self.index.transaction(read=True) as db:
            rows = db.execute("SELECT contributor, COUNT(*) AS tokens, "
                              "SUM(CASE WHEN revoked IS NULL THEN 1 ELSE 0 END) AS live, "
                              "MIN(created) AS since FROM tokens GROUP BY contributor ORDER BY contributor")
            return [dict(r) for r in rows]
