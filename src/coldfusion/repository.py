"""The repository: content-addressed safetensors bodies plus an SQLite lineage index.

Layout:  ROOT/objects/<sha256>.safetensors   every body ever stored, named by content
         ROOT/index.sqlite                   versions, contributions, metrics (WAL mode)

A checkpoint file is written atomically before any index row points at it, and every
index change is one transaction, so a crash leaves at worst an unreferenced file.
"""

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from coldfusion.checkpoint import Tensors, atomic_write_bytes, load_tensors, save_tensors, serialize, sha256_bytes
from coldfusion.encodings import decode_contribution
from coldfusion.errors import ColdFusionError
from coldfusion.faults import failpoint
from coldfusion.fusion import fuse_files, get_operator
from coldfusion.inputs import sha256_file
from coldfusion.tensorfile import SafetensorsReader
from coldfusion.validation import ValidationSettings, inspect_contribution, norm_outliers

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    sha256 TEXT PRIMARY KEY, num_bytes INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL REFERENCES checkpoints(sha256),
    parent INTEGER REFERENCES versions(id),
    model_source TEXT NOT NULL,
    fusion TEXT,              -- JSON: {"method", "params", "contributions", "missing"?, "declined"?, "rejected"?,
                              --        "rebased"?}; NULL for a root
    run TEXT, iteration INTEGER, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contributions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL REFERENCES checkpoints(sha256),
    base_version INTEGER NOT NULL REFERENCES versions(id),
    contributor TEXT NOT NULL, task TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL,    -- JSON
    stats TEXT NOT NULL DEFAULT '{}',  -- JSON {"fisher" | "gram": sha256 of the statistics file}
    fused_into INTEGER REFERENCES versions(id),
    created TEXT NOT NULL,
    rejected TEXT,            -- why validation refused it (NULL: not refused)
    encoding TEXT NOT NULL DEFAULT '{"kind": "full"}');  -- JSON: how the stored file encodes the body
CREATE TABLE IF NOT EXISTS metrics (
    version INTEGER NOT NULL REFERENCES versions(id), task TEXT NOT NULL, protocol TEXT NOT NULL,
    values_json TEXT NOT NULL, run TEXT, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS computed (
    key TEXT PRIMARY KEY,     -- digest of what was computed, from what, with which settings
    kind TEXT NOT NULL,       -- e.g. 'intertrained', 'finetune_score', 'features'
    sha256 TEXT REFERENCES checkpoints(sha256),  -- the tensors it produced, if any
    value TEXT NOT NULL,      -- JSON: what it measured, and what it cost
    created TEXT NOT NULL);
"""


DECODED_PREFIX = ".decoded-"  # scratch directories of a fusion in progress (in ROOT)


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
    rejected: str | None = None  # why validation refused it
    encoding: dict = field(default_factory=lambda: {"kind": "full"})  # how its stored file encodes the body
    num_bytes: int = 0  # stored (and sent): its file plus its statistics' files


@dataclass(frozen=True)
class Computed:
    """A cached result of an expensive, deterministic computation (see `Repository.remember`)."""

    key: str
    kind: str
    sha256: str | None
    value: dict


@dataclass(frozen=True)
class IntegrityReport:
    """What `Repository.verify` found."""

    checkpoints: int  # indexed and checked
    problems: list[str]  # damage: the repository cannot be trusted until it is repaired
    temporary: list[Path]  # left by a write that was interrupted (harmless)
    unreferenced: list[Path]  # stored, but the index transaction never committed (harmless)
    cleaned: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


class Repository:
    def __init__(self, root: Path, create: bool = True):
        """Open the repository at `root`, creating it unless `create` is False."""
        self.root = Path(root)
        if not create and not (self.root / "index.sqlite").exists():
            raise ColdFusionError(f"no repository at {self.root} (it has no index.sqlite)")
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.root / "index.sqlite", timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            db.executescript(SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(contributions)")}
            if "stats" not in columns:  # repositories made before statistics travelled with contributions
                db.execute("ALTER TABLE contributions ADD COLUMN stats TEXT NOT NULL DEFAULT '{}'")
            if "rejected" not in columns:  # ... and before contributions were validated
                db.execute("ALTER TABLE contributions ADD COLUMN rejected TEXT")
            if "encoding" not in columns:  # ... and before they could be sent encoded
                db.execute("""ALTER TABLE contributions ADD COLUMN encoding TEXT NOT NULL DEFAULT '{"kind": "full"}'""")
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
        failpoint("repository.unindexed")  # the transaction is open: the row is not yet committed
        return sha

    def checkpoint_bytes(self, sha256: str) -> int:
        """Size of a stored file, as indexed."""
        with self._db() as db:
            row = db.execute("SELECT num_bytes FROM checkpoints WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            raise ColdFusionError(f"no checkpoint {sha256[:12]}... in repository {self.root}")
        return row[0]

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
        encoding: dict | None = None,
    ) -> Contribution:
        """Store a contribution as sent: a body, or its `encoding` (see coldfusion.encodings),
        which is decoded against `base_version` when it is fused; and its statistics, if any."""
        with self._db() as db:
            self._version_row(db, base_version)
            sha = self._store(db, tensors)
            stat_shas = {kind: self._store(db, values) for kind, values in (stats or {}).items()}
            cur = db.execute(
                "INSERT INTO contributions (sha256, base_version, contributor, task, num_examples, metrics, stats,"
                " created, encoding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sha, base_version, contributor, task, num_examples, json.dumps(metrics or {}),
                 json.dumps(stat_shas), _now(), json.dumps(encoding or {"kind": "full"})),
            )
            return self._contribution_row(db, cur.lastrowid)

    def _contribution_row(self, db, cid: int) -> Contribution:
        row = db.execute("SELECT * FROM contributions WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise ColdFusionError(f"no contribution {cid} in repository {self.root}")
        stats = json.loads(row["stats"])
        files = [row["sha256"], *stats.values()]
        num_bytes = db.execute(f"SELECT COALESCE(SUM(num_bytes), 0) FROM checkpoints WHERE sha256 IN "
                               f"({','.join('?' * len(files))})", files).fetchone()[0]
        return Contribution(**{**dict(row), "metrics": json.loads(row["metrics"]), "stats": stats,
                               "encoding": json.loads(row["encoding"]), "num_bytes": num_bytes})

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
        missing: dict[str, str] | None = None, declined: dict[str, str] | None = None,
        validation: ValidationSettings | None = None,
    ) -> Version:
        """Validate the contributions, fuse those that pass into a new version whose parent is
        `base_version`. `missing` (contributor -> reason) records the chosen contributors that
        sent nothing, `declined` those that chose not to train on the base. Refused
        contributions keep their reason in the index and in the version's fusion record;
        with fewer than `validation.min_accepted` left, nothing is fused and the error lists
        every reason.
        """
        params, validation = params or {}, validation or ValidationSettings()
        op = get_operator(method)
        op.check_params(params)  # a typo fails before anything is read
        base = self.version(base_version)
        with self._db() as db:
            contribs = [self._contribution_row(db, c) for c in contribution_ids]
        # Encoded contributions are decoded here, into files deleted after the fusion.
        with tempfile.TemporaryDirectory(dir=self.root, prefix=DECODED_PREFIX) as scratch:
            rejected, norms, dense = self._validate(base, contribs, validation, Path(scratch))
            accepted = [c for c in contribs if c.id not in rejected]
            if len(accepted) < validation.min_accepted:
                with self._db() as db:
                    self._mark_rejected(db, rejected)
                reasons = "; ".join(f"contribution {cid}: {why}" for cid, why in rejected.items())
                raise ColdFusionError(f"only {len(accepted)} of {len(contribs)} contributions passed validation, "
                                      f"fewer than min_accepted = {validation.min_accepted}: {reasons}")
            stale = [c for c in accepted if c.base_version != base.id]
            current = self.load(base.sha256) if stale else None  # once, for every stale contribution
            rebased = {c.id: {"from_version": c.base_version, "sha256": self._rebase(c, dense[c.id], current)}
                       for c in stale}
            weights = [c.num_examples for c in accepted] if op.weighting == "examples" else None
            stats = None
            if op.needs_stats:
                lacking = [c.id for c in accepted if op.needs_stats not in c.stats]
                if lacking:
                    raise ColdFusionError(f"fusion method '{method}' needs {op.needs_stats} statistics, which "
                                          f"contributions {lacking} did not send")
                stats = [self.path_of(c.stats[op.needs_stats]) for c in accepted]
            bodies = [self.path_of(rebased[c.id]["sha256"]) if c.id in rebased else dense[c.id] for c in accepted]
            fused = fuse_files(bodies, method, weights, base=self.path_of(base.sha256) if op.needs_base else None,
                               stats=stats, norms=[norms[c.id] for c in accepted] if op.needs_norms else None,
                               **params)
        fusion = {"method": method, "params": params, "contributions": [c.id for c in accepted],
                  "delta_norms": {str(c.id): round(norms[c.id], 6) for c in accepted},
                  **({"missing": missing} if missing else {}),
                  **({"declined": declined} if declined else {}),
                  **({"rejected": {str(k): v for k, v in rejected.items()}} if rejected else {}),
                  **({"rebased": {str(k): v for k, v in rebased.items()}} if rebased else {})}
        with self._db() as db:
            sha = self._store(db, fused)
            version = self._insert_version(db, sha, base.model_source, base.id, fusion, run, iteration)
            db.executemany("UPDATE contributions SET fused_into = ? WHERE id = ?",
                           [(version.id, c.id) for c in accepted])
            self._mark_rejected(db, rejected)
        return version

    def _validate(self, base: Version, contribs: list[Contribution], settings: ValidationSettings,
                  scratch: Path) -> tuple[dict[int, str], dict[int, float], dict[int, Path]]:
        """(contribution id -> why it is refused, -> its delta norm, -> the file of its body:
        the stored one, or for an encoded contribution its decoding, written into `scratch`)."""
        rejected, norms, dense = {}, {}, {}
        bases: dict[int, Tensors] = {}  # each base an encoded contribution needs, read (and hashed) once
        if sha256_file(self.path_of(base.sha256)) != base.sha256:
            raise ColdFusionError(f"base version {base.id} ({self.path_of(base.sha256)}) does not match its "
                                  "checksum: the repository is damaged; run `coldfusion verify` on it")
        for c in contribs:
            if c.base_version != base.id and settings.stale == "reject":
                rejected[c.id] = (f"stale: trained from version {c.base_version}, not the current base "
                                  f"{base.id} (validation.stale = reject)")
                continue
            path = self.path_of(c.sha256)
            if not path.exists() or sha256_file(path) != c.sha256:
                rejected[c.id] = f"its file {path.name} is missing or does not match its checksum"
                continue
            own_base = base if c.base_version == base.id else self.version(c.base_version)
            if c.encoding.get("kind", "full") != "full":
                try:
                    if own_base.id not in bases:
                        bases[own_base.id] = self.load(own_base.sha256)
                    path = self._decode(c, bases[own_base.id], scratch)
                except ColdFusionError as exc:
                    rejected[c.id] = f"its {c.encoding.get('kind')} encoding cannot be decoded: {exc}"
                    continue
            dense[c.id] = path
            with SafetensorsReader([path]) as body, SafetensorsReader([self.path_of(own_base.sha256)]) as b:
                found = inspect_contribution(body, b)
            if found.problem:
                rejected[c.id] = found.problem
            else:
                norms[c.id] = found.delta_norm
        for cid, why in norm_outliers(norms, settings).items():
            rejected[cid] = why
        return rejected, norms, dense

    def _decode(self, contribution: Contribution, own_base: Tensors, scratch: Path) -> Path:
        """Write the body an encoded contribution stands for (on `own_base`, the tensors of the
        version it was trained from) into `scratch`; return its path."""
        payload = load_tensors(self.path_of(contribution.sha256))  # its checksum was just verified
        body = decode_contribution(payload, contribution.encoding, own_base)
        path = scratch / f"{contribution.id}.safetensors"
        save_tensors(path, body)
        return path

    def _rebase(self, contribution: Contribution, body_path: Path, current: Tensors) -> str:
        """Store `current + (body - the base it was trained from)`, the stale contribution's
        update carried onto the current base; return its checksum."""
        body, own_base = load_tensors(body_path), self.load_version(contribution.base_version)
        moved = {k: (current[k] + (v - own_base[k])).to(v.dtype) if v.is_floating_point() else v
                 for k, v in body.items()}
        with self._db() as db:
            return self._store(db, moved)

    @staticmethod
    def _mark_rejected(db, rejected: dict[int, str]) -> None:
        db.executemany("UPDATE contributions SET rejected = ? WHERE id = ?", [(why, c) for c, why in rejected.items()])

    # -- integrity -----------------------------------------------------------------
    def verify(self, clean: bool = False) -> IntegrityReport:
        """Check the index (SQLite's integrity check, every reference resolves) and every
        stored file against its checksum. With `clean`, delete what interrupted writes left
        behind: temporary files and objects no index row names (only while no other process
        is writing to this repository: its next object may not be indexed yet)."""
        problems = []
        with self._db() as db:
            problems += [f"index: {r[0]}" for r in db.execute("PRAGMA integrity_check") if r[0] != "ok"]
            problems += [f"index: {table} row {rowid} names a missing {parent} row"
                         for table, rowid, parent, _ in db.execute("PRAGMA foreign_key_check")]
            known = {r["sha256"]: r["num_bytes"] for r in db.execute("SELECT sha256, num_bytes FROM checkpoints")}
            named = {r[0] for r in db.execute("SELECT sha256 FROM versions UNION SELECT sha256 FROM contributions"
                                              " UNION SELECT sha256 FROM computed WHERE sha256 IS NOT NULL")}
            for r in db.execute("SELECT stats FROM contributions"):
                named |= set(json.loads(r[0]).values())
            for r in db.execute("SELECT fusion FROM versions WHERE fusion IS NOT NULL"):
                named |= {x["sha256"] for x in json.loads(r[0]).get("rebased", {}).values()}
        problems += [f"checkpoint {sha[:12]}... is used but was never stored" for sha in sorted(named - set(known))]
        for sha in sorted(known):
            path = self.path_of(sha)
            if not path.exists():
                problems.append(f"{path.name}: missing")
            elif sha256_file(path) != sha:
                problems.append(f"{path.name}: does not match its checksum (corrupt)")
        temporary = sorted([p for p in self.objects.iterdir() if p.name.startswith(".")]
                           + list(self.root.glob(DECODED_PREFIX + "*")))
        unreferenced = sorted(p for p in self.objects.glob("*.safetensors") if p.stem not in known)
        if clean:
            for path in temporary + unreferenced:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        return IntegrityReport(len(known), problems, temporary, unreferenced, cleaned=clean)

    # -- metrics -------------------------------------------------------------------
    def record_metrics(self, version: int, task: str, protocol: str, values: dict, run: str | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                       (version, task, protocol, json.dumps(values), run, _now()))

    def metrics(self, version: int) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM metrics WHERE version = ? ORDER BY rowid", (version,)).fetchall()
        return [{**dict(r), "values": json.loads(r["values_json"])} for r in rows]

    # -- cached computations -------------------------------------------------------
    def remember(self, key: str, kind: str, value: dict, tensors: Tensors | None = None) -> Computed:
        """Keep the result of a computation under `key` (a digest of everything it depended
        on), with the tensors it produced, if any; a key already kept is left as it was."""
        with self._db() as db:
            sha = None if tensors is None else self._store(db, tensors)
            db.execute("INSERT OR IGNORE INTO computed VALUES (?, ?, ?, ?, ?)",
                       (key, kind, sha, json.dumps(value), _now()))
            row = db.execute("SELECT * FROM computed WHERE key = ?", (key,)).fetchone()
        return Computed(row["key"], row["kind"], row["sha256"], json.loads(row["value"]))

    def recall(self, key: str) -> Computed | None:
        """What `remember` kept under `key`, or None."""
        with self._db() as db:
            row = db.execute("SELECT * FROM computed WHERE key = ?", (key,)).fetchone()
        return None if row is None else Computed(row["key"], row["kind"], row["sha256"], json.loads(row["value"]))

    def lineage(self, ref: int | str) -> list[Version]:
        """The version and its ancestors, newest first."""
        chain = [self.version(ref)]
        while chain[-1].parent is not None:
            chain.append(self.version(chain[-1].parent))
        return chain
