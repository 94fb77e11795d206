"""The repository: content-addressed safetensors bodies plus a lineage index.

Layout:  ROOT/objects/<sha256>.safetensors   every body ever stored, named by content
         ROOT/files/<sha256>                 the pretrained model's config and tokenizer files
         ROOT/index.sqlite                   versions, contributions, metrics (WAL mode)

or, where ROOT/storage.json names shared storage (storage/settings.py), the index in
PostgreSQL and the objects and files in an S3 bucket, ROOT/objects and ROOT/files caching
them: several service replicas, each with its own ROOT, then share one repository.

A repository stands alone: with its model's files beside the bodies, it exports and
evaluates after any move, with or without the model directory it was made from.

A checkpoint file is written atomically before any index row points at it, and every
index change is one transaction, so a crash leaves at worst an unreferenced file.

Why one module of this size: `Repository` is the only code that reads or writes index rows
and objects (versions, contributions, model files, metrics, cached computations), so the
transaction and atomic-write rules live in one place. What works on top of those rows is
beside it: `fusion_pipeline.py`, `integrity.py`, `schema.py`, `storage/`.
"""

import json
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.faults import failpoint
from coldfusion.io.checkpoint import Tensors, load_tensors, serialize, sha256_bytes
from coldfusion.io.model_files import MODEL_FILES, sha256_file
from coldfusion.io.storage.index import PostgresIndex, SqliteIndex
from coldfusion.io.storage.objects import LocalObjects, S3Objects
from coldfusion.io.storage.settings import FILE as STORAGE_FILE
from coldfusion.io.storage.settings import read_settings
from coldfusion.repository.fusion_pipeline import fuse_contributions
from coldfusion.repository.intake import Claim, Received, Refusal, admit
from coldfusion.repository.integrity import MIN_AGE_SECONDS, IntegrityReport, verify
from coldfusion.repository.refs import BadReference, VersionRef, parse_ref
from coldfusion.repository.schema import create_index

if TYPE_CHECKING:
    from coldfusion.repository.validation import ValidationSettings


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
    run_id: str | None = None  # the run directory's identity (its `run-id` file)
    abandoned: str | None = None  # why it is no longer part of its run (an iteration redone on resume)
    model: int | None = None  # the stored model files of its architecture and tokenizer
    held_back: str | None = None  # why the operator's suite holds it back (repository.hold_back)

    @property
    def live(self) -> bool:
        """In use: neither abandoned nor held back (only a live version is `latest`, claimed as a
        base, or fused onto)."""
        return self.abandoned is None and self.held_back is None

    @property
    def status(self) -> str:
        """live, held_back or abandoned: what every reader (CLI, HTTP API, web page) shows."""
        return "abandoned" if self.abandoned else "held_back" if self.held_back else "live"


@dataclass(frozen=True)
class StoredModel:
    """A pretrained model's config and tokenizer files, kept in the repository."""

    id: int
    name: str  # portable: 'default', a hub id, or the directory's name
    files: dict[str, str]  # file name -> sha256


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
    run_id: str | None = None  # the run that asked for it (None: sent from outside a run)
    abandoned: str | None = None  # why it will never be fused (its iteration was redone on resume)
    delta_norm: float | None = None  # ||body - its base||, measured at admission (None: admitted before that)
    requeued_as: int | None = None  # its fusion was held back: it waits again as that contribution
    requeued_from: int | None = None  # it is the requeue of that contribution
    fused_into_held_back: str | None = None  # why the version it was fused into is held back, if it is

    @property
    def waiting(self) -> bool:
        """Neither fused, nor refused, nor abandoned."""
        return self.fused_into is None and self.rejected is None and self.abandoned is None

    @property
    def status(self) -> str:
        """waiting, fused, refused, requeued or abandoned: what every reader shows. A contribution
        of a held-back fusion is requeued once (a new row waits for the next fusion); held back
        a second time, it is refused."""
        if self.requeued_as is not None:
            return "requeued"
        if self.rejected is not None or (self.fused_into is not None and self.fused_into_held_back is not None):
            return "refused"
        return "abandoned" if self.abandoned else "fused" if self.fused_into is not None else "waiting"

    @property
    def reason(self) -> str | None:
        """Why it has its status (None for waiting and fused)."""
        if self.requeued_as is not None:
            return (f"its fusion, version {self.fused_into}, was held back ({self.fused_into_held_back}); it waits "
                    f"again as contribution {self.requeued_as}")
        if self.rejected is None and self.fused_into_held_back is not None:
            once = "" if self.requeued_from is None else \
                f" after it had been requeued once (from contribution {self.requeued_from})"
            return f"its fusion, version {self.fused_into}, was held back ({self.fused_into_held_back}){once}"
        return self.rejected or self.abandoned


@dataclass(frozen=True)
class Computed:
    """A cached result of an expensive, deterministic computation (see `Repository.remember`)."""

    key: str
    kind: str
    sha256: str | None
    value: dict


class Repository:
    INDEX = "index.sqlite"

    @classmethod
    def exists_at(cls, root: Path) -> bool:
        """Whether `root` holds a repository (its index, or the settings of its shared storage):
        the one test every caller uses."""
        return (Path(root) / cls.INDEX).exists() or (Path(root) / STORAGE_FILE).exists()

    def __init__(self, root: Path, create: bool = True):
        """Open the repository at `root`, creating it unless `create` is False."""
        self.root = Path(root)
        if not create and not self.exists_at(self.root):
            raise ColdFusionError(f"no repository at {self.root} (it has no index.sqlite or storage.json)")
        self.storage = read_settings(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.storage.objects:
            bucket, prefix = self.storage.bucket, self.storage.prefix
            self.object_store, self.file_store = (
                S3Objects(self.root / name, bucket, f"{prefix}{name}/", self.storage.s3_endpoint,
                          self.storage.s3_region) for name in ("objects", "files"))
        else:
            self.object_store, self.file_store = (LocalObjects(self.root / name) for name in ("objects", "files"))
        self.objects, self.files = self.object_store.directory, self.file_store.directory  # local (or cache)
        self.index = PostgresIndex(self.storage.index) if self.storage.index else SqliteIndex(self.root / self.INDEX)
        try:
            create_index(self.index)
        except sqlite3.DatabaseError as exc:
            raise ColdFusionError(f"{self.root / self.INDEX} cannot be opened as a repository index ({exc}); "
                                  "it is damaged or not an index: restore it from a backup") from None

    def _db(self):
        """One transaction per `with` (commit or roll back); writers one at a time."""
        return self.index.transaction()

    def _read(self):
        """A transaction that only reads: it neither waits for the writer nor holds it up."""
        return self.index.transaction(read=True)

    # -- checkpoints ---------------------------------------------------------------
    def path_of(self, sha256: str) -> Path:
        """The local file of a stored body (fetched from shared storage first if need be; a path
        that does not exist: the body is missing or corrupt)."""
        return self.object_store.fetch(f"{sha256}.safetensors")

    def _put(self, tensors: Tensors) -> tuple[str, int]:
        """Write a body to the object store; (its checksum, its size). Called before the index
        transaction that names it, so no writer waits while a body is written or uploaded."""
        data = serialize(tensors)
        sha = sha256_bytes(data)
        self.object_store.put(f"{sha}.safetensors", data)
        return sha, len(data)

    @staticmethod
    def _index(db, stored: tuple[str, int]) -> str:
        """Index a body `_put` wrote, inside the caller's transaction; its checksum."""
        db.execute("INSERT INTO checkpoints VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (*stored, _now()))
        failpoint("repository.unindexed")  # the transaction is open: the row is not yet committed
        return stored[0]

    def checkpoint_bytes(self, sha256: str) -> int:
        """Size of a stored file, as indexed."""
        with self._read() as db:
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
        run_id: str | None = None, model_files: Path | None = None, model_name: str | None = None,
    ) -> Version:
        """Store a body as a new version. `model_files`: a model directory whose config and
        tokenizer files are stored with it (default: `model_source`, when it is a directory;
        a child version inherits its parent's); `model_name`: their portable name."""
        files = model_files or (Path(model_source) if Path(model_source).is_dir() else None)
        stored = self._put(tensors)
        with self._db() as db:
            sha = self._index(db, stored)
            model = self._store_model(db, Path(files), model_name or Path(files).name) if files else None
            if model is None and parent is not None:
                model = self._version_row(db, parent).model
            return self._insert_version(db, sha, model_source, parent, fusion, run, iteration, run_id, model)

    def _insert_version(self, db, sha, model_source, parent, fusion, run, iteration, run_id=None,
                        model=None) -> Version:
        new_id = db.execute(
            "INSERT INTO versions (sha256, parent, model_source, fusion, run, iteration, created, run_id, model)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (sha, parent, model_source, None if fusion is None else json.dumps(fusion), run, iteration, _now(),
             run_id, model),
        ).fetchone()[0]
        return self._version_row(db, new_id)

    def _version_row(self, db, version_id: int) -> Version:
        row = db.execute("SELECT * FROM versions WHERE id = ?", (version_id,)).fetchone()
        if row is None:
            raise ColdFusionError(f"no version {version_id} in repository {self.root}")
        return Version(**{**dict(row), "fusion": json.loads(row["fusion"]) if row["fusion"] else None})

    def version(self, ref: "int | str | VersionRef") -> Version:
        """A version by id (3, 'v3') or by a unique prefix of its checksum (refs.py says what a
        reference may be; 'latest' is `resolve`'s)."""
        parsed = parse_ref(ref)
        if parsed.latest:
            raise BadReference("'latest' names no fixed version here; give a version id")
        with self._read() as db:
            if parsed.id is not None:
                return self._version_row(db, parsed.id)
            rows = db.execute("SELECT id FROM versions WHERE substr(sha256, 1, ?) = ?",
                              (len(parsed.prefix), parsed.prefix)).fetchall()
            if len(rows) != 1:
                raise ColdFusionError(f"'{parsed.prefix}' matches {len(rows)} versions in {self.root}; "
                                      "give a version id")
            return self._version_row(db, rows[0]["id"])

    def versions(self) -> list[Version]:
        with self._read() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM versions ORDER BY id")]
            return [self._version_row(db, i) for i in ids]

    def load_version(self, ref: int | str) -> Tensors:
        return self.load(self.version(ref).sha256)

    def latest(self) -> Version:
        """The newest live version (neither abandoned nor held back)."""
        live = [v for v in self.versions() if v.live]
        if not live:
            raise ColdFusionError(f"repository {self.root} has no versions yet")
        return live[-1]

    def resolve(self, ref: "int | str | VersionRef") -> Version:
        """`version` that also understands 'latest' (the newest live version)."""
        parsed = parse_ref(ref)
        return self.latest() if parsed.latest else self.version(parsed)

    # -- model files ---------------------------------------------------------------
    def file_path(self, sha256: str) -> Path:
        return self.file_store.fetch(sha256)

    def _store_model(self, db, model_dir: Path, name: str) -> int:
        """Store the config and tokenizer files of `model_dir` (content-addressed); return
        the id of the model they make up (one row per distinct set of files)."""
        found = {n: model_dir / n for n in MODEL_FILES if (model_dir / n).is_file()}
        if "config.json" not in found:
            raise ColdFusionError(f"{model_dir} has no config.json: is it a model directory?")
        files = {}
        for file_name, path in sorted(found.items()):
            data = path.read_bytes()
            sha = sha256_bytes(data)
            self.file_store.put(sha, data)
            db.execute("INSERT INTO files VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (sha, len(data), _now()))
            files[file_name] = sha
        key = json.dumps(files, sort_keys=True)
        db.execute("INSERT INTO models (name, files, created) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                   (name, key, _now()))
        return db.execute("SELECT id FROM models WHERE files = ?", (key,)).fetchone()[0]

    def adopt_model(self, model_dir: Path, name: str | None = None) -> list[int]:
        """Store `model_dir`'s config and tokenizer files for every version that has none (a
        repository made before they were stored); return those versions' ids."""
        with self._db() as db:
            model = self._store_model(db, Path(model_dir), name or Path(model_dir).name)
            ids = [r[0] for r in db.execute("SELECT id FROM versions WHERE model IS NULL")]
            db.execute("UPDATE versions SET model = ? WHERE model IS NULL", (model,))
        return ids

    def model_of(self, version: Version) -> StoredModel | None:
        if version.model is None:
            return None
        with self._read() as db:
            row = db.execute("SELECT * FROM models WHERE id = ?", (version.model,)).fetchone()
        return StoredModel(row["id"], row["name"], json.loads(row["files"]))

    def write_model_files(self, model: StoredModel, into: Path) -> Path:
        """Copy a stored model's files into the directory `into`, each checked against its checksum."""
        into.mkdir(parents=True, exist_ok=True)
        for file_name, sha in model.files.items():
            source = self.file_path(sha)
            if not source.exists() or sha256_file(source) != sha:
                raise ColdFusionError(f"{source} ({file_name} of model {model.name}) is missing or corrupt; "
                                      "run `coldfusion verify` on the repository")
            shutil.copyfile(source, into / file_name)
        return into

    # -- contributions -------------------------------------------------------------
    def add_contribution(
        self, payload: "Tensors | Received | bytes", *, base_version: int | str, contributor: str, task: str,
        num_examples: int, metrics: dict | None = None, stats: dict[str, Tensors] | None = None,
        encoding: dict | None = None, run_id: str | None = None, rules: "ValidationSettings | None" = None,
    ) -> Contribution:
        """Admit a contribution as sent: a body, or its `encoding` (see coldfusion.encodings), and
        its statistics, if any, under the operator's `rules`; see `intake.admit` (it raises
        `intake.Refused`, naming the rule, and records why)."""
        claim = Claim(contributor, task, base_version, num_examples, dict(encoding or {"kind": "full"}),
                      dict(metrics or {}), run_id)
        return admit(self, payload, claim, rules, stats)

    def refusals(self, contributor: str | None = None, run_id: str | None = None) -> list[Refusal]:
        """What admission refused (oldest first), of one contributor or run if given."""
        query, args = "SELECT * FROM refusals WHERE 1=1", []
        if contributor is not None:
            query, args = query + " AND contributor = ?", [*args, contributor]
        if run_id is not None:
            query, args = query + " AND run_id = ?", [*args, run_id]
        with self._read() as db:
            return [Refusal(**dict(r)) for r in db.execute(query + " ORDER BY id", args).fetchall()]

    def _contribution_row(self, db, cid: int) -> Contribution:
        row = db.execute("SELECT c.*, v.held_back AS fused_into_held_back FROM contributions c LEFT JOIN versions v "
                         "ON v.id = c.fused_into WHERE c.id = ?", (cid,)).fetchone()
        if row is None:
            raise ColdFusionError(f"no contribution {cid} in repository {self.root}")
        stats = json.loads(row["stats"])
        files = [row["sha256"], *stats.values()]
        num_bytes = db.execute(f"SELECT CAST(COALESCE(SUM(num_bytes), 0) AS BIGINT) FROM checkpoints WHERE sha256 IN "
                               f"({','.join('?' * len(files))})", files).fetchone()[0]
        return Contribution(**{**dict(row), "metrics": json.loads(row["metrics"]), "stats": stats,
                               "encoding": json.loads(row["encoding"]), "num_bytes": num_bytes})

    def contributions(self, *, base_version: int | None = None, fused_into: int | None = None) -> list[Contribution]:
        query, args = "SELECT id FROM contributions WHERE 1=1", []
        if base_version is not None:
            query, args = query + " AND base_version = ?", args + [base_version]
        if fused_into is not None:
            query, args = query + " AND fused_into = ?", args + [fused_into]
        with self._read() as db:
            return [self._contribution_row(db, r["id"]) for r in db.execute(query + " ORDER BY id", args).fetchall()]

    def uploads_waiting(self) -> list[Contribution]:
        """Contributions sent from outside any run (`coldfusion contribute`) that are neither
        fused, refused nor abandoned: what `coldfusion fuse` fuses by default (runs fuse their own)."""
        with self._read() as db:  # filtered by the index: a service asks at every poll, over its whole history
            ids = [r[0] for r in db.execute("SELECT id FROM contributions WHERE fused_into IS NULL AND rejected IS "
                                            "NULL AND abandoned IS NULL AND run_id IS NULL ORDER BY id")]
            return [self._contribution_row(db, i) for i in ids]

    # -- fusion and integrity (their own modules) ---------------------------------
    def fuse(self, base_version: int, contribution_ids: Sequence[int], **options) -> Version:
        """Validate and fuse contributions into a new version: see `fusion_pipeline.fuse_contributions`."""
        return fuse_contributions(self, base_version, contribution_ids, **options)

    def verify(self, clean: bool = False, min_age_seconds: float = MIN_AGE_SECONDS) -> IntegrityReport:
        """Check the index and every stored file: see `integrity.verify`."""
        return verify(self, clean, min_age_seconds)

    @staticmethod
    def _mark_rejected(db, rejected: dict[int, str]) -> None:
        db.executemany("UPDATE contributions SET rejected = ? WHERE id = ? AND fused_into IS NULL",
                       [(why, c) for c, why in rejected.items()])

    def abandon_unfinished(self, run_id: str, completed_iterations: int | None) -> list[str]:
        """Mark what run `run_id` stored past its last finished iteration as abandoned: the
        versions of later iterations and the contributions sent for them (trained from the
        last finished version or a later one). None: no iteration finished, so everything of
        the run. A resumed run redoes that iteration; nothing of the lost attempt is reused,
        and the lost attempt stays on record. Returns what was marked ('version N', ...)."""
        after = -1 if completed_iterations is None else completed_iterations
        why = (f"run {run_id} was resumed after iteration {after}; this iteration was redone" if after >= 0
               else f"run {run_id} was restarted before it finished iteration 0")
        with self._db() as db:
            versions = [r[0] for r in db.execute(
                "SELECT id FROM versions WHERE run_id = ? AND iteration > ? AND abandoned IS NULL", (run_id, after))]
            contributions = [r[0] for r in db.execute(
                "SELECT c.id FROM contributions c JOIN versions b ON b.id = c.base_version WHERE c.run_id = ? "
                "AND c.abandoned IS NULL AND (? < 0 OR b.iteration >= ?)", (run_id, after, after))]
            db.executemany("UPDATE versions SET abandoned = ? WHERE id = ?", [(why, v) for v in versions])
            db.executemany("UPDATE contributions SET abandoned = ? WHERE id = ?", [(why, c) for c in contributions])
        return [f"version {v}" for v in versions] + [f"contribution {c}" for c in contributions]

    def hold_back(self, version: int, reason: str) -> list[int]:
        """Keep a version on record but out of use (the publication's backtracking of a harmful
        update): never `latest`, never claimed as a base, nothing fused onto it. Each of its
        contributions that was not a requeue already waits again for the next fusion, as a new
        row (`requeued_as` / `requeued_from`); those held back a second time are refused. The
        ids of the new rows."""
        with self._db() as db:
            self._version_row(db, version)
            if db.execute("UPDATE versions SET held_back = ? WHERE id = ? AND held_back IS NULL AND abandoned IS NULL",
                          (reason, version)).rowcount != 1:
                return []  # held back already (by another replica) or abandoned
            again = []
            for old in db.execute("SELECT * FROM contributions WHERE fused_into = ? AND requeued_from IS NULL "
                                  "ORDER BY id", (version,)).fetchall():
                new_id = db.execute(
                    "INSERT INTO contributions (sha256, base_version, contributor, task, num_examples, metrics, stats, "
                    "created, encoding, run_id, delta_norm, requeued_from) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (old["sha256"], old["base_version"], old["contributor"], old["task"], old["num_examples"],
                     old["metrics"], old["stats"], _now(), old["encoding"], old["run_id"], old["delta_norm"],
                     old["id"])).fetchone()[0]
                db.execute("UPDATE contributions SET requeued_as = ? WHERE id = ?", (new_id, old["id"]))
                again.append(new_id)
            return again

    # -- metrics -------------------------------------------------------------------
    def record_metrics(self, version: int, task: str, protocol: str, values: dict, run: str | None = None,
                       once: bool = False) -> bool:
        """Add a metrics row; with `once`, only if (version, task, protocol, run) has none yet,
        decided inside the index's write transaction, so that of several processes (service
        replicas) measuring the same thing the first one's row stands. Whether it was added."""
        sql = "INSERT INTO metrics (version, task, protocol, values_json, run, created) SELECT ?, ?, ?, ?, ?, ?"
        params = (version, task, protocol, json.dumps(values), run, _now())
        if once:
            sql += (" WHERE NOT EXISTS (SELECT 1 FROM metrics WHERE version = ? AND task = ? AND protocol = ?"
                    " AND COALESCE(run, '') = COALESCE(?, ''))")
            params += (version, task, protocol, run)
        with self._db() as db:
            return db.execute(sql, params).rowcount == 1

    def metrics(self, version: int) -> list[dict]:
        with self._read() as db:
            rows = db.execute("SELECT version, task, protocol, values_json, run, created FROM metrics "
                              "WHERE version = ? ORDER BY rowid", (version,)).fetchall()
        return [{**dict(r), "values": json.loads(r["values_json"])} for r in rows]

    # -- cached computations -------------------------------------------------------
    def remember(self, key: str, kind: str, value: dict, tensors: Tensors | None = None) -> Computed:
        """Keep the result of a computation under `key` (a digest of everything it depended
        on), with the tensors it produced, if any; a key already kept is left as it was."""
        stored = None if tensors is None else self._put(tensors)
        with self._db() as db:
            sha = None if stored is None else self._index(db, stored)
            db.execute("INSERT INTO computed VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       (key, kind, sha, json.dumps(value), _now()))
            row = db.execute("SELECT * FROM computed WHERE key = ?", (key,)).fetchone()
        return Computed(row["key"], row["kind"], row["sha256"], json.loads(row["value"]))

    def recall(self, key: str) -> Computed | None:
        """What `remember` kept under `key`, or None."""
        with self._read() as db:
            row = db.execute("SELECT * FROM computed WHERE key = ?", (key,)).fetchone()
        return None if row is None else Computed(row["key"], row["kind"], row["sha256"], json.loads(row["value"]))

    def lineage(self, ref: int | str) -> list[Version]:
        """The version and its ancestors, newest first (walked in one read)."""
        first = self.version(ref)
        with self._read() as db:
            ids = [r[0] for r in db.execute(
                "WITH RECURSIVE chain(id, parent, depth) AS (SELECT id, parent, 0 FROM versions WHERE id = ? "
                "UNION ALL SELECT v.id, v.parent, c.depth + 1 FROM versions v JOIN chain c ON v.id = c.parent) "
                "SELECT id FROM chain ORDER BY depth", (first.id,))]
            return [first, *(self._version_row(db, i) for i in ids[1:])]
