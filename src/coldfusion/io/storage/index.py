"""The index's connection: SQLite (the default, ROOT/index.sqlite) or PostgreSQL (shared by replicas).

Both give their callers the same contract: `with index.transaction() as db` is one
transaction (committed, or rolled back on any error) during which no other writer runs
(SQLite's BEGIN IMMEDIATE; in PostgreSQL an advisory lock held to the end of the
transaction, so replicas take turns exactly as processes on one SQLite file do);
`index.transaction(read=True)` only reads, and neither waits for the writer nor holds it up
(SQLite's WAL snapshot; PostgreSQL without the lock). Statements
use `?` placeholders; rows are read by column name or position; a statement that breaks a
uniqueness or lineage rule raises `IndexConflict`.
"""

import atexit
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from coldfusion.infra.errors import ColdFusionError

WRITER_LOCK = 0x636F6C64  # the advisory lock every PostgreSQL transaction of the index takes


class IndexConflict(ColdFusionError):
    """A write that would break a uniqueness or lineage rule; nothing of its transaction was kept."""


class SqliteIndex:
    dialect = "sqlite"

    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @contextmanager
    def transaction(self, read: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("BEGIN" if read else "BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as exc:
            raise IndexConflict(str(exc)) from None
        finally:
            db.close()


class _Row(tuple):
    """A row read by position or by column name, like sqlite3.Row."""

    names: tuple[str, ...] = ()

    def __getitem__(self, key):
        return super().__getitem__(self.names.index(key) if isinstance(key, str) else key)

    def keys(self) -> tuple[str, ...]:
        return self.names


def _row_factory(cursor):
    names = tuple(c.name for c in cursor.description or ())
    row_type = type("Row", (_Row,), {"names": names})
    return lambda values: row_type(values)


class _Postgres:
    """A psycopg connection that takes the index's `?` placeholders."""

    def __init__(self, connection):
        self.connection = connection

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, args: Sequence = ()):
        if not args:
            return self.connection.execute(sql)
        return self.connection.execute(self._sql(sql), tuple(args))

    def executemany(self, sql: str, rows):
        cursor = self.connection.cursor()
        cursor.executemany(self._sql(sql), [tuple(r) for r in rows])
        return cursor


_pools: dict[str, object] = {}  # one connection pool per database and process
_pools_lock = threading.Lock()


def _unreachable(url: str, why: str) -> ColdFusionError:
    return ColdFusionError(f"cannot reach the repository's index at {url}: {why} (is the server running, and the "
                           "password in PGPASSWORD or ~/.pgpass?)")


def _pool(url: str):
    """This process's pool of connections to `url`, opened on first use (a server that cannot
    be reached is an error at once, not after the pool's timeout)."""
    with _pools_lock:
        if url not in _pools:
            import psycopg
            from psycopg_pool import ConnectionPool

            try:
                psycopg.connect(url, connect_timeout=30).close()
            except psycopg.OperationalError as exc:
                raise _unreachable(url, str(exc).strip()) from None
            pool = ConnectionPool(url, min_size=1, max_size=8, open=True, timeout=60, name="coldfusion-index",
                                  kwargs={"row_factory": _row_factory, "connect_timeout": 30})
            atexit.register(pool.close)
            _pools[url] = pool
        return _pools[url]


class PostgresIndex:
    dialect = "postgresql"

    def __init__(self, url: str):
        self.url = url

    def __str__(self) -> str:
        return self.url

    @contextmanager
    def transaction(self, read: bool = False) -> Iterator[_Postgres]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with _pool(self.url).connection() as connection, connection.transaction():
                if not read:
                    connection.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
                yield _Postgres(connection)
        except psycopg.IntegrityError as exc:
            raise IndexConflict(str(exc).strip()) from None
        except PoolTimeout as exc:
            raise _unreachable(self.url, str(exc).strip()) from None
