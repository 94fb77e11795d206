"""The repository: content-addressed safetensors bodies plus an SQLite lineage index.

Layout:  ROOT/objects/<sha256>.safetensors   every body ever stored, named by content
         ROOT/files/<sha256>                 the pretrained model's config and tokenizer files
         ROOT/index.sqlite                   versions, contributions, metrics (WAL mode)

A repository stands alone: with its model's files beside the bodies, it exports and
evaluates after any move, with or without the model directory it was made from.

A checkpoint file is written atomically before any index row points at it, and every
index change is one transaction, so a crash leaves at worst an unreferenced file.
"""

import json
import shutil
import sqlite3
import tempfile
from collections import Counter
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
from coldfusion.inputs import MODEL_FILES, sha256_file
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
    -- added later: run_id TEXT, abandoned TEXT (why it is no longer part of its run),
    --              model INTEGER REFERENCES models(id) (its architecture and tokenizer)
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
    -- added later: run_id TEXT, abandoned TEXT
CREATE TABLE IF NOT EXISTS metrics (
    version INTEGER NOT NULL REFERENCES versions(id), task TEXT NOT NULL, protocol TEXT NOT NULL,
    values_json TEXT NOT NULL, run TEXT, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    sha256 TEXT PRIMARY KEY, num_bytes INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,       -- portable: 'default', a hub id, or the directory's name
    files TEXT NOT NULL UNIQUE,  -- JSON {file name: sha256}, keys sorted
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS computed (
    key TEXT PRIMARY KEY,     -- digest of what was computed, from what, with which settings
    kind TEXT NOT NULL,       -- e.g. 'intertrained', 'finetune_score', 'features'
    sha256 TEXT REFERENCES checkpoints(sha256),  -- the tensors it produced, if any
    value TEXT NOT NULL,      -- JSON: what it measured, and what it cost
    created TEXT NOT NULL);
"""

# The lineage rules, enforced by the index itself; `verify` checks them too (an index
# edited by hand, or made before these existed, may break them).
LINEAGE = """
CREATE TRIGGER IF NOT EXISTS fused_at_most_once BEFORE UPDATE OF fused_into ON contributions
    WHEN OLD.fused_into IS NOT NULL AND NEW.fused_into IS NOT OLD.fused_into
    BEGIN SELECT RAISE(ABORT, 'lineage: a contribution is fused at most once'); END;
CREATE TRIGGER IF NOT EXISTS refused_never_fused BEFORE UPDATE OF fused_into ON contributions
    WHEN NEW.fused_into IS NOT NULL AND (OLD.rejected IS NOT NULL OR OLD.abandoned IS NOT NULL)
    BEGIN SELECT RAISE(ABORT, 'lineage: a refused or abandoned contribution is never fused'); END;
CREATE TRIGGER IF NOT EXISTS fused_never_refused BEFORE UPDATE OF rejected ON contributions
    WHEN OLD.fused_into IS NOT NULL AND NEW.rejected IS NOT NULL
    BEGIN SELECT RAISE(ABORT, 'lineage: a fused contribution cannot be refused afterwards'); END;
-- last: it cannot be made on an index that already holds duplicates
CREATE UNIQUE INDEX IF NOT EXISTS one_payload_per_contributor_and_base
    ON contributions(sha256, contributor, base_version) WHERE abandoned IS NULL;
"""


DECODED_PREFIX = ".decoded-"  # scratch directories of a fusion in progress (in ROOT)


def _settled(c: "Contribution") -> str:
    """Why a contribution can no longer be fused."""
    if c.fused_into is not None:
        return f"was already fused into version {c.fused_into}"
    return f"was refused ({c.rejected})" if c.rejected else f"was abandoned ({c.abandoned})"


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

    @property
    def waiting(self) -> bool:
        """Neither fused, nor refused, nor abandoned."""
        return self.fused_into is None and self.rejected is None and self.abandoned is None


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
    without_model_files: list[int] = field(default_factory=list)  # versions that name their model only by a path

    @property
    def ok(self) -> bool:
        return not self.problems


class Repository:
    def __init__(self, root: Path, create: bool = True):
        """Open the repository at `root`, creating it unless `create` is False."""
        self.root = Path(root)
        if not create and not (self.root / "index.sqlite").exists():
            raise ColdFusionError(f"no repository at {self.root} (it has no index.sqlite)")
        self.objects, self.files = self.root / "objects", self.root / "files"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.files.mkdir(exist_ok=True)
        db = sqlite3.connect(self.root / "index.sqlite", timeout=60)
        try:
            self._open(db)
        except sqlite3.DatabaseError as exc:
            raise ColdFusionError(f"{self.root / 'index.sqlite'} cannot be opened as a repository index ({exc}); "
                                  "it is damaged or not an index: restore it from a backup") from None
        finally:
            db.close()

    @staticmethod
    def _open(db) -> None:
        """Create or migrate the index's tables and lineage rules."""
        db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        db.executescript(SCHEMA)
        columns = {r[1] for r in db.execute("PRAGMA table_info(contributions)")}
        if "stats" not in columns:  # repositories made before statistics travelled with contributions
            db.execute("ALTER TABLE contributions ADD COLUMN stats TEXT NOT NULL DEFAULT '{}'")
        if "rejected" not in columns:  # ... and before contributions were validated
            db.execute("ALTER TABLE contributions ADD COLUMN rejected TEXT")
        if "encoding" not in columns:  # ... and before they could be sent encoded
            db.execute("""ALTER TABLE contributions ADD COLUMN encoding TEXT NOT NULL DEFAULT '{"kind": "full"}'""")
        for table in ("versions", "contributions"):  # ... and before runs could abandon an iteration
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            for column in ("run_id", "abandoned"):
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
            if table == "versions" and "model" not in have:  # ... and before they kept the model's files
                db.execute("ALTER TABLE versions ADD COLUMN model INTEGER REFERENCES models(id)")
        db.commit()
        try:
            db.executescript(LINEAGE)
        except sqlite3.IntegrityError:
            pass  # an older index already holds duplicates: `verify` names them

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
        run_id: str | None = None, model_files: Path | None = None, model_name: str | None = None,
    ) -> Version:
        """Store a body as a new version. `model_files`: a model directory whose config and
        tokenizer files are stored with it (default: `model_source`, when it is a directory;
        a child version inherits its parent's); `model_name`: their portable name."""
        files = model_files or (Path(model_source) if Path(model_source).is_dir() else None)
        with self._db() as db:
            sha = self._store(db, tensors)
            model = self._store_model(db, Path(files), model_name or Path(files).name) if files else None
            if model is None and parent is not None:
                model = self._version_row(db, parent).model
            return self._insert_version(db, sha, model_source, parent, fusion, run, iteration, run_id, model)

    def _insert_version(self, db, sha, model_source, parent, fusion, run, iteration, run_id=None,
                        model=None) -> Version:
        cur = db.execute(
            "INSERT INTO versions (sha256, parent, model_source, fusion, run, iteration, created, run_id, model)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sha, parent, model_source, None if fusion is None else json.dumps(fusion), run, iteration, _now(),
             run_id, model),
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

    def latest(self) -> Version:
        """The newest version that is not abandoned."""
        live = [v for v in self.versions() if not v.abandoned]
        if not live:
            raise ColdFusionError(f"repository {self.root} has no versions yet")
        return live[-1]

    def resolve(self, ref: int | str) -> Version:
        """`version` that also understands 'latest'."""
        return self.latest() if str(ref) == "latest" else self.version(ref)

    # -- model files ---------------------------------------------------------------
    def file_path(self, sha256: str) -> Path:
        return self.files / sha256

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
            if not self.file_path(sha).exists():
                atomic_write_bytes(self.file_path(sha), data)
            db.execute("INSERT OR IGNORE INTO files VALUES (?, ?, ?)", (sha, len(data), _now()))
            files[file_name] = sha
        key = json.dumps(files, sort_keys=True)
        db.execute("INSERT OR IGNORE INTO models (name, files, created) VALUES (?, ?, ?)", (name, key, _now()))
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
        with self._db() as db:
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
        self, tensors: Tensors, *, base_version: int, contributor: str, task: str,
        num_examples: int, metrics: dict | None = None, stats: dict[str, Tensors] | None = None,
        encoding: dict | None = None, run_id: str | None = None,
    ) -> Contribution:
        """Store a contribution as sent: a body, or its `encoding` (see coldfusion.encodings),
        which is decoded against `base_version` when it is fused; and its statistics, if any.
        The same payload from the same contributor against the same base is refused: one
        party cannot weigh itself twice by sending its file twice."""
        with self._db() as db:
            self._version_row(db, base_version)
            sha = self._store(db, tensors)
            earlier = db.execute("SELECT id FROM contributions WHERE sha256 = ? AND contributor = ? AND "
                                 "base_version = ? AND abandoned IS NULL", (sha, contributor, base_version)).fetchone()
            if earlier is not None:
                raise ColdFusionError(f"duplicate: {contributor} already sent this exact payload against version "
                                      f"{base_version} (contribution {earlier['id']}); it is not stored twice")
            stat_shas = {kind: self._store(db, values) for kind, values in (stats or {}).items()}
            cur = db.execute(
                "INSERT INTO contributions (sha256, base_version, contributor, task, num_examples, metrics, stats,"
                " created, encoding, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sha, base_version, contributor, task, num_examples, json.dumps(metrics or {}),
                 json.dumps(stat_shas), _now(), json.dumps(encoding or {"kind": "full"}), run_id),
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
        run_id: str | None = None, missing: dict[str, str] | None = None, declined: dict[str, str] | None = None,
        validation: ValidationSettings | None = None,
    ) -> Version:
        """Validate the contributions, fuse those that pass into a new version whose parent is
        `base_version`. A contribution is fused at most once, never once refused or
        abandoned, and a run's contributions only by that run (`run_id`). `missing`
        (contributor -> reason) records the chosen contributors that sent nothing, `declined`
        those that chose not to train on the base. Refused contributions keep their reason
        in the index and in the version's fusion record; with fewer than
        `validation.min_accepted` left, nothing is fused and the error lists every reason.
        """
        params, validation = params or {}, validation or ValidationSettings()
        op = get_operator(method)
        op.check_params(params)  # a typo fails before anything is read
        base = self.version(base_version)
        if base.abandoned:
            raise ColdFusionError(f"version {base.id} was abandoned ({base.abandoned}); fuse onto another version")
        repeated = sorted(c for c, n in Counter(contribution_ids).items() if n > 1)
        if repeated:
            raise ColdFusionError(f"contributions {repeated} are listed more than once")
        with self._db() as db:
            contribs = [self._contribution_row(db, c) for c in contribution_ids]
        settled = [f"contribution {c.id} {_settled(c)}" for c in contribs if not c.waiting]
        settled += [f"contribution {c.id} was sent to run {c.run_id}, which fuses or abandons it itself (resume "
                    "that run)" for c in contribs if c.waiting and c.run_id is not None and c.run_id != run_id]
        if settled:
            raise ColdFusionError("the lineage is not rewritten: " + "; ".join(settled))
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
        try:
            with self._db() as db:
                sha = self._store(db, fused)
                version = self._insert_version(db, sha, base.model_source, base.id, fusion, run, iteration, run_id,
                                               base.model)
                db.executemany("UPDATE contributions SET fused_into = ? WHERE id = ?",
                               [(version.id, c.id) for c in accepted])
                self._mark_rejected(db, rejected)
        except sqlite3.IntegrityError as exc:  # another fusion settled them since they were read
            raise ColdFusionError(f"nothing was fused: {exc} (another fusion took some of these contributions "
                                  "first)") from None
        return version

    def _validate(self, base: Version, contribs: list[Contribution], settings: ValidationSettings,
                  scratch: Path) -> tuple[dict[int, str], dict[int, float], dict[int, Path]]:
        """(contribution id -> why it is refused, -> its delta norm, -> the file of its body:
        the stored one, or for an encoded contribution its decoding, written into `scratch`)."""
        rejected, norms, dense = {}, {}, {}
        bases: dict[int, Tensors] = {}  # each base an encoded contribution needs, read (and hashed) once
        first_of: dict[str, Contribution] = {}  # payload checksum -> the first contribution that sent it
        if sha256_file(self.path_of(base.sha256)) != base.sha256:
            raise ColdFusionError(f"base version {base.id} ({self.path_of(base.sha256)}) does not match its "
                                  "checksum: the repository is damaged; run `coldfusion verify` on it")
        for c in contribs:
            if c.sha256 in first_of and first_of[c.sha256].base_version == c.base_version:  # a copy weighs once
                twin = first_of[c.sha256]
                rejected[c.id] = (f"duplicate: the same payload as contribution {twin.id} from {twin.contributor}")
                continue
            first_of.setdefault(c.sha256, c)
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
            problems += self._lineage_problems(db)
            stored_files = {r["sha256"] for r in db.execute("SELECT sha256 FROM files")}
            without_model = [r[0] for r in db.execute("SELECT id FROM versions WHERE model IS NULL ORDER BY id")]
            used_files = {sha for r in db.execute("SELECT files FROM models") for sha in json.loads(r[0]).values()}
        problems += [f"model file {sha[:12]}... is used but was never stored"
                     for sha in sorted(used_files - stored_files)]
        problems += [f"checkpoint {sha[:12]}... is used but was never stored" for sha in sorted(named - set(known))]
        stored = [(f"files/{sha}", self.file_path(sha), sha) for sha in sorted(stored_files)]
        stored += [(self.path_of(sha).name, self.path_of(sha), sha) for sha in sorted(known)]
        for name, path, sha in stored:
            if not path.exists():
                problems.append(f"{name}: missing")
            elif sha256_file(path) != sha:
                problems.append(f"{name}: does not match its checksum (corrupt)")
        temporary = sorted([p for p in [*self.objects.iterdir(), *self.files.iterdir()] if p.name.startswith(".")]
                           + list(self.root.glob(DECODED_PREFIX + "*")))
        unreferenced = sorted([p for p in self.objects.glob("*.safetensors") if p.stem not in known]
                              + [p for p in self.files.iterdir() if not p.name.startswith(".")
                                 and p.name not in stored_files])
        if clean:
            for path in temporary + unreferenced:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        return IntegrityReport(len(known), problems, temporary, unreferenced, cleaned=clean,
                               without_model_files=without_model)

    @staticmethod
    def _lineage_problems(db) -> list[str]:
        """Every break of the lineage rules (see LINEAGE), as a sentence."""
        problems = []
        listed: dict[int, list[int]] = {}  # contribution -> the versions whose fusion record lists it
        versions = {r["id"]: r for r in db.execute("SELECT id, parent, fusion, abandoned FROM versions")}
        for v in versions.values():
            fusion = json.loads(v["fusion"]) if v["fusion"] else {}
            for c in fusion.get("contributions", []):
                listed.setdefault(c, []).append(v["id"])
            if v["parent"] is not None and versions.get(v["parent"], {"abandoned": None})["abandoned"] \
                    and not v["abandoned"]:
                problems.append(f"lineage: version {v['id']} builds on abandoned version {v['parent']}")
        for c in db.execute("SELECT id, base_version, contributor, fused_into, rejected, abandoned FROM contributions"):
            where = listed.get(c["id"], [])
            if len(where) > 1:
                problems.append(f"lineage: contribution {c['id']} is fused into several versions {where}")
            if c["fused_into"] is not None and c["fused_into"] not in where:
                problems.append(f"lineage: contribution {c['id']} says it was fused into version {c['fused_into']}, "
                                "whose fusion record does not list it")
            for v in where:
                if v != c["fused_into"]:
                    problems.append(f"lineage: version {v} lists contribution {c['id']}, which says it was fused "
                                    f"into {c['fused_into'] or 'nothing'}")
            if c["rejected"] is not None and c["fused_into"] is not None:
                problems.append(f"lineage: contribution {c['id']} was refused and yet fused into version "
                                f"{c['fused_into']}")
            fused_version = versions.get(c["fused_into"])
            if c["abandoned"] is not None and fused_version is not None and not fused_version["abandoned"]:
                problems.append(f"lineage: abandoned contribution {c['id']} is fused into version {c['fused_into']}")
            if fused_version is not None:
                rebased = json.loads(fused_version["fusion"] or "{}").get("rebased", {})
                if fused_version["parent"] != c["base_version"] and str(c["id"]) not in rebased:
                    problems.append(f"lineage: contribution {c['id']} was trained from version {c['base_version']} "
                                    f"but fused onto version {fused_version['parent']} without being rebased")
        for r in db.execute("SELECT sha256, contributor, base_version, GROUP_CONCAT(id) AS ids FROM contributions "
                            "WHERE abandoned IS NULL GROUP BY sha256, contributor, base_version HAVING COUNT(*) > 1"):
            problems.append(f"lineage: contributions {r['ids']} are the same payload from {r['contributor']} "
                            f"against version {r['base_version']} (a duplicate)")
        return problems

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
