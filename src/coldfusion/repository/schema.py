"""The repository index: its tables, the lineage rules it enforces itself, and how an index
made by an older version is brought up to date."""

import sqlite3

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
    --              model INTEGER REFERENCES models(id) (its architecture and tokenizer),
    --              held_back TEXT (why the operator's suite holds it back; NULL: it was not)
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
    -- added later: run_id TEXT, abandoned TEXT, delta_norm REAL (||body - its base||, measured at admission),
    --              requeued_as / requeued_from INTEGER (a contribution of a held-back fusion, waiting again as
    --              the new row requeued_as; the new row names its origin in requeued_from)
CREATE TABLE IF NOT EXISTS refusals (  -- what admission refused: nothing of it is stored but this row
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contributor TEXT NOT NULL, task TEXT, base TEXT, num_examples INTEGER,
    sha256 TEXT,              -- of the bytes received, when they were read
    rule TEXT NOT NULL,       -- the rule it broke: base, format, architecture, finite, no-op, norm, duplicate, ...
    reason TEXT NOT NULL, run_id TEXT, created TEXT NOT NULL);
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
-- last: it cannot be made on an index that already holds duplicates (a requeued row repeats its origin's payload)
DROP INDEX IF EXISTS one_payload_per_contributor_and_base;
CREATE UNIQUE INDEX IF NOT EXISTS one_admission_per_payload
    ON contributions(sha256, contributor, base_version) WHERE abandoned IS NULL AND requeued_from IS NULL;
"""


def open_index(db) -> None:
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
        if table == "contributions":  # ... and before admission measured them, and held-back fusions requeued
            for column, kind in (("delta_norm", "REAL"), ("requeued_as", "INTEGER"), ("requeued_from", "INTEGER")):
                if column not in have:
                    db.execute(f"ALTER TABLE contributions ADD COLUMN {column} {kind}")
        if table == "versions" and "held_back" not in have:  # ... and before holding back was a status of its own
            db.execute("ALTER TABLE versions ADD COLUMN held_back TEXT")
            db.execute("UPDATE versions SET held_back = substr(abandoned, 12), abandoned = NULL "
                       "WHERE abandoned LIKE 'held back: %'")
        if table == "versions" and "model" not in have:  # ... and before they kept the model's files
            db.execute("ALTER TABLE versions ADD COLUMN model INTEGER REFERENCES models(id)")
    db.commit()
    try:
        db.executescript(LINEAGE)
    except sqlite3.IntegrityError:
        pass  # an older index already holds duplicates: `verify` names them


# The same tables in PostgreSQL's dialect, for a shared index (storage.json). A new index
# needs no migrations; the lineage rules that SQLite's triggers enforce are kept by the
# conditional updates of the fusion (a contribution is marked fused only while it is
# waiting) and checked by `verify`.
POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    sha256 TEXT PRIMARY KEY, num_bytes BIGINT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    sha256 TEXT PRIMARY KEY, num_bytes BIGINT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL, files TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    sha256 TEXT NOT NULL REFERENCES checkpoints(sha256),
    parent BIGINT REFERENCES versions(id),
    model_source TEXT NOT NULL, fusion TEXT, run TEXT, iteration INTEGER, created TEXT NOT NULL,
    run_id TEXT, abandoned TEXT, model BIGINT REFERENCES models(id), held_back TEXT);
ALTER TABLE versions ADD COLUMN IF NOT EXISTS held_back TEXT;
CREATE TABLE IF NOT EXISTS contributions (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    sha256 TEXT NOT NULL REFERENCES checkpoints(sha256),
    base_version BIGINT NOT NULL REFERENCES versions(id),
    contributor TEXT NOT NULL, task TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL, stats TEXT NOT NULL DEFAULT '{}',
    fused_into BIGINT REFERENCES versions(id), created TEXT NOT NULL, rejected TEXT,
    encoding TEXT NOT NULL DEFAULT '{"kind": "full"}', run_id TEXT, abandoned TEXT, delta_norm DOUBLE PRECISION,
    requeued_as BIGINT, requeued_from BIGINT);
ALTER TABLE contributions ADD COLUMN IF NOT EXISTS delta_norm DOUBLE PRECISION;
ALTER TABLE contributions ADD COLUMN IF NOT EXISTS requeued_as BIGINT;
ALTER TABLE contributions ADD COLUMN IF NOT EXISTS requeued_from BIGINT;
CREATE TABLE IF NOT EXISTS refusals (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    contributor TEXT NOT NULL, task TEXT, base TEXT, num_examples BIGINT, sha256 TEXT, rule TEXT NOT NULL,
    reason TEXT NOT NULL, run_id TEXT, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,  -- named as SQLite's implicit row id: one query orders both
    version BIGINT NOT NULL REFERENCES versions(id), task TEXT NOT NULL, protocol TEXT NOT NULL,
    values_json TEXT NOT NULL, run TEXT, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS computed (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, sha256 TEXT REFERENCES checkpoints(sha256),
    value TEXT NOT NULL, created TEXT NOT NULL);
DROP INDEX IF EXISTS one_payload_per_contributor_and_base;
CREATE UNIQUE INDEX IF NOT EXISTS one_admission_per_payload
    ON contributions(sha256, contributor, base_version) WHERE abandoned IS NULL AND requeued_from IS NULL;
"""


_created: set = set()  # the indexes whose tables this process has made sure of


def create_index(index) -> None:
    """Create (or bring up to date) the tables of `index`, a storage.index connection: once per
    process and index (a repository is opened for every request of the service)."""
    if index.dialect == "postgresql":
        if index.url not in _created:
            with index.transaction() as db:  # replicas starting together take turns
                db.execute(POSTGRES_SCHEMA)
            _created.add(index.url)
        return
    try:  # the file by identity: one deleted and made again (or replaced) is checked again
        key = (str(index.path), index.path.stat().st_ino, index.path.stat().st_size > 0)
    except FileNotFoundError:
        key = None
    if key in _created:
        return
    db = sqlite3.connect(index.path, timeout=60)
    try:
        open_index(db)
    finally:
        db.close()
    stat = index.path.stat()
    _created.add((str(index.path), stat.st_ino, stat.st_size > 0))
