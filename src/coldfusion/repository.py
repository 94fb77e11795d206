"""The repository: content-addressed safetensors bodies plus an SQLite lineage index.

Layout:  ROOT/objects/<sha256>.safetensors   every body ever stored, named by content
         ROOT/index.sqlite                   versions, contributions, metrics (WAL mode)

A checkpoint file is written atomically before any index row points at it, and every
index change is one transaction, so a crash leaves at worst an unreferenced file.
"""

import json
import sqlite3
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from coldfusion.checkpoint import Tensors, atomic_write_bytes, load_tensors, serialize, sha256_bytes
from coldfusion.errors import ColdFusionError
from coldfusion.fusion import fuse_files, get_operator

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    sha256 TEXT PRIMARY KEY, num_bytes INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL REFERENCES checkpoints(sha256),
    parent INTEGER REFERENCES versions(id),
    model_source TEXT NOT NULL,
    fusion TEXT,              -- JSON: {"method", "params", "contributions", "missing"?}; NULL for a root
    run TEXT, iteration INTEGER, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contributions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL REFERENCES checkpoints(sha256),
    base_version INTEGER NOT NULL REFERENCES versions(id),
    contributor TEXT NOT NULL, task TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL,    -- JSON
    stats TEXT NOT NULL DEFAULT '{}',  -- JSON {"fisher" | "gram": sha256 of the statistics file}
    fused_into INTEGER REFERENCES versions(id),
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    version INTEGER NOT NULL REFERENCES versions(id), task TEXT NOT NULL, protocol TEXT NOT NULL,
    values_json TEXT NOT NULL, run TEXT, created TEXT NOT NULL);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Version:
    id: int
    sha256: str
    parent: int | None
    model_source: str
    fusion: dict | None
    run: str | None
    iteration: int | None
    created: str


@dataclass(frozen=True)
class Contribution:
    id: int
    sha256: str
    base_version: int
    contributor: str
    task: str
    num_examples: int
    metrics: dict
    stats: dict  # kind -> sha256 of its statistics file
    fused_into: int | None
    created: str


class Repository:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.root / "index.sqlite", timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            db.executescript(SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(contributions)")}
            if "stats" not in columns:  # repositories made before statistics travelled with contributions
                db.execute("ALTER TABLE contributions ADD COLUMN stats TEXT NOT NULL DEFAULT '{}'")
                db.commit()
        finally:
            db.close()

    @contextmanager
    def _db(self):
        """One connection per operation, one transaction per `with` (commit or roll back)."""
        db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    # -- checkpoints ---------------------------------------------------------------
    def path_of(self, sha256: str) -> Path:
        return self.objects / f"{sha256}.safetensors"

    def _store(self, db, tensors: Tensors) -> str:
        data = serialize(tensors)
        sha = sha256_bytes(data)
        if not self.path_of(sha).exists():
            atomic_write_bytes(self.path_of(sha), data)
        db.execute("INSERT OR IGNORE INTO checkpoints VALUES (?, ?, ?)", (sha, len(data), _now()))
        return sha

    def load(self, sha256: str) -> Tensors:
        """Read a stored body and verify its checksum."""
        return load_tensors(self.path_of(sha256), expected_sha256=sha256)

    # -- versions ------------------------------------------------------------------
    def add_version(
        self, tensors: Tensors, *, model_source: str, parent: int | None = None,
        fusion: dict | None = None, run: str | None = None, iteration: int | None = None,
    ) -> Version:
        with self._db() as db:
            sha = self._store(db, tensors)
            return self._insert_version(db, sha, model_source, parent, fusion, run, iteration)

    def _insert_version(self, db, sha, model_source, parent, fusion, run, iteration) -> Version:
        cur = db.execute(
            "INSERT INTO versions (sha256, parent, model_source, fusion, run, iteration, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (sha, parent, model_source, None if fusion is None else json.dumps(fusion), run, iteration, _now()),
        )
        return self._version_row(db, cur.lastrowid)

    def _version_row(self, db, version_id: int) -> Version:
        row = db.execute("SELECT * FROM versions WHERE id = ?", (version_id,)).fetchone()
        if row is None:
            raise ColdFusionError(f"no version {version_id} in repository {self.root}")
        return Version(**{**dict(row), "fusion": json.loads(row["fusion"]) if row["fusion"] else None})

    def version(self, ref: int | str) -> Version:
        """A version by id (3, 'v3') or by a unique prefix of its checksum."""
        with self._db() as db:
            text = str(ref)
            if text.lstrip("v").isdigit():
                return self._version_row(db, int(text.lstrip("v")))
            rows = db.execute("SELECT id FROM versions WHERE sha256 LIKE ?", (text + "%",)).fetchall()
            if len(rows) != 1:
                raise ColdFusionError(f"'{ref}' matches {len(rows)} versions in {self.root}; give a version id")
            return self._version_row(db, rows[0]["id"])

    def versions(self) -> list[Version]:
        with self._db() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM versions ORDER BY id")]
            return [self._version_row(db, i) for i in ids]

    def load_version(self, ref: int | str) -> Tensors:
        return self.load(self.version(ref).sha256)

    # -- contributions -------------------------------------------------------------
    def add_contribution(
        self, tensors: Tensors, *, base_version: int, contributor: str, task: str,
        num_examples: int, metrics: dict | None = None, stats: dict[str, Tensors] | None = None,
    ) -> Contribution:
        """Store a contributed body (and its Fisher / Gram statistics, if any)."""
        with self._db() as db:
            self._version_row(db, base_version)
            sha = self._store(db, tensors)
            stat_shas = {kind: self._store(db, values) for kind, values in (stats or {}).items()}
            cur = db.execute(
                "INSERT INTO contributions (sha256, base_version, contributor, task, num_examples, metrics, stats,"
                " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sha, base_version, contributor, task, num_examples, json.dumps(metrics or {}),
                 json.dumps(stat_shas), _now()),
            )
            return self._contribution_row(db, cur.lastrowid)

    def _contribution_row(self, db, cid: int) -> Contribution:
        row = db.execute("SELECT * FROM contributions WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise ColdFusionError(f"no contribution {cid} in repository {self.root}")
        return Contribution(**{**dict(row), "metrics": json.loads(row["metrics"]), "stats": json.loads(row["stats"])})

    def contributions(self, *, base_version: int | None = None, fused_into: int | None = None) -> list[Contribution]:
        query, args = "SELECT id FROM contributions WHERE 1=1", []
        if base_version is not None:
            query, args = query + " AND base_version = ?", args + [base_version]
        if fused_into is not None:
            query, args = query + " AND fused_into = ?", args + [fused_into]
        with self._db() as db:
            return [self._contribution_row(db, r["id"]) for r in db.execute(query + " ORDER BY id", args).fetchall()]

    # -- fusion --------------------------------------------------------------------
    def fuse(
        self, base_version: int, contribution_ids: Sequence[int], *, method: str = "average",
        params: dict | None = None, run: str | None = None, iteration: int | None = None,
        missing: dict[str, str] | None = None,
    ) -> Version:
        """Fuse contributions into a new version whose parent is `base_version`. `missing`
        (contributor -> reason) records the chosen contributors that sent nothing."""
        params = params or {}
        base = self.version(base_version)
        with self._db() as db:
            contribs = [self._contribution_row(db, c) for c in contribution_ids]
        op = get_operator(method)
        weights = [c.num_examples for c in contribs] if op.weighting == "examples" else None
        stats = None
        if op.needs_stats:
            lacking = [c.id for c in contribs if op.needs_stats not in c.stats]
            if lacking:
                raise ColdFusionError(f"fusion method '{method}' needs {op.needs_stats} statistics, which "
                                      f"contributions {lacking} did not send")
            stats = [self.path_of(c.stats[op.needs_stats]) for c in contribs]
        fused = fuse_files(
            [self.path_of(c.sha256) for c in contribs], method, weights,
            base=self.path_of(base.sha256) if op.needs_base else None, stats=stats, **params,
        )
        fusion = {"method": method, "params": params, "contributions": [c.id for c in contribs],
                  **({"missing": missing} if missing else {})}
        with self._db() as db:
            sha = self._store(db, fused)
            version = self._insert_version(db, sha, base.model_source, base.id, fusion, run, iteration)
            db.executemany("UPDATE contributions SET fused_into = ? WHERE id = ?",
                           [(version.id, c.id) for c in contribs])
        return version

    # -- metrics -------------------------------------------------------------------
    def record_metrics(self, version: int, task: str, protocol: str, values: dict, run: str | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                       (version, task, protocol, json.dumps(values), run, _now()))

    def metrics(self, version: int) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM metrics WHERE version = ? ORDER BY rowid", (version,)).fetchall()
        return [{**dict(r), "values": json.loads(r["values_json"])} for r in rows]

    def lineage(self, ref: int | str) -> list[Version]:
        """The version and its ancestors, newest first."""
        chain = [self.version(ref)]
        while chain[-1].parent is not None:
            chain.append(self.version(chain[-1].parent))
        return chain
