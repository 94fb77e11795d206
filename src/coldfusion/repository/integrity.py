"""`coldfusion verify`: is the repository what its index says? The index's own integrity,
every stored file against its checksum, the lineage rules, and what interrupted writes
left behind (harmless, removable with `clean` once they are old enough that no writer can
still be about to index them)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from coldfusion.io.model_files import sha256_file
from coldfusion.io.storage.objects import checksum_of, modified
from coldfusion.repository.fusion_pipeline import DECODED_PREFIX

if TYPE_CHECKING:
    from coldfusion.repository import Repository


@dataclass(frozen=True)
class IntegrityReport:
    """What `Repository.verify` found."""

    checkpoints: int  # indexed and checked
    problems: list[str]  # damage: the repository cannot be trusted until it is repaired
    temporary: list[Path]  # left by a write that was interrupted (harmless)
    unreferenced: list[Path]  # stored, but the index transaction never committed (harmless)
    cleaned: bool = False  # `clean` was asked: what is listed above was deleted, except `recent`
    recent: int = 0  # found but kept by `clean`: younger than its minimum age (a writer may still index it)
    without_model_files: list[int] = field(default_factory=list)  # versions that name their model only by a path

    @property
    def ok(self) -> bool:
        return not self.problems


MIN_AGE_SECONDS = 3600.0


def verify(repo: Repository, clean: bool = False, min_age_seconds: float = MIN_AGE_SECONDS) -> IntegrityReport:
    """Check the index (SQLite's integrity check, every reference resolves) and every
    stored file against its checksum. With `clean`, delete what interrupted writes left
    behind: temporary files and objects no index row names, once they are `min_age_seconds`
    old. A writer stores a body before the index transaction that names it, so a younger
    unnamed object may be one a running service or replica is about to index (the same
    grace `git gc` gives unreachable objects); 0 deletes everything, safe only while
    nothing else writes to the repository."""
    problems = []
    with repo._db() as db:
        if repo.index.dialect == "sqlite":  # PostgreSQL checks its own pages and enforces every reference
            problems += [f"index: {r[0]}" for r in db.execute("PRAGMA integrity_check") if r[0] != "ok"]
            problems += [f"index: {table} row {rowid} names a missing {parent} row"
                         for table, rowid, parent, _ in db.execute("PRAGMA foreign_key_check")]
        known = {r["sha256"]: r["num_bytes"] for r in db.execute("SELECT sha256, num_bytes FROM checkpoints")}
        named = {r[0] for r in db.execute("SELECT sha256 FROM versions UNION SELECT sha256 FROM contributions"
                                          " UNION SELECT sha256 FROM computed WHERE sha256 IS NOT NULL")}
        for r in db.execute("SELECT stats FROM contributions"):
            named |= set(json.loads(r[0]).values())
        for r in db.execute("SELECT fusion FROM versions WHERE fusion IS NOT NULL"):
            fusion = json.loads(r[0])
            named |= {x["sha256"] for x in fusion.get("rebased", {}).values()}
            named |= {fusion["outer"]["momentum_buffer"]} if "momentum_buffer" in fusion.get("outer", {}) else set()
        problems += _lineage_problems(db)
        stored_files = {r["sha256"] for r in db.execute("SELECT sha256 FROM files")}
        without_model = [r[0] for r in db.execute("SELECT id FROM versions WHERE model IS NULL ORDER BY id")]
        used_files = {sha for r in db.execute("SELECT files FROM models") for sha in json.loads(r[0]).values()}
    problems += [f"model file {sha[:12]}... is used but was never stored"
                 for sha in sorted(used_files - stored_files)]
    problems += [f"checkpoint {sha[:12]}... is used but was never stored" for sha in sorted(named - set(known))]
    objects, files = repo.object_store.names(), repo.file_store.names()
    stored = [(repo.file_store, sha, f"files/{sha}") for sha in sorted(stored_files)]
    stored += [(repo.object_store, f"{sha}.safetensors", f"{sha}.safetensors") for sha in sorted(known)]
    for store, key, name in stored:
        if key not in (files if store is repo.file_store else objects):
            problems.append(f"{name}: missing")
            continue
        path = store.fetch(key)  # shared storage: a copy that does not match its name is not kept
        if not path.exists() or sha256_file(path) != checksum_of(key):
            problems.append(f"{name}: does not match its checksum (corrupt)")
    temporary = sorted(repo.object_store.temporaries() + repo.file_store.temporaries()
                       + list(repo.root.glob(DECODED_PREFIX + "*")))
    unreferenced = sorted([(repo.object_store, n, t) for n, t in objects.items() if checksum_of(n) not in known]
                          + [(repo.file_store, n, t) for n, t in files.items() if n not in stored_files],
                          key=lambda x: x[1])  # (store, name, when it was written)
    recent = 0
    if clean:
        cutoff = time.time() - min_age_seconds
        for path in temporary:
            if (modified(path) or 0.0) > cutoff:
                recent += 1
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for store, name, written in unreferenced:
            if written > cutoff:
                recent += 1
            else:
                store.remove(name)
    return IntegrityReport(len(known), problems, temporary, [store.local(n) for store, n, _ in unreferenced],
                           cleaned=clean, recent=recent, without_model_files=without_model)


def _lineage_problems(db) -> list[str]:
    """Every break of the lineage rules (see LINEAGE), as a sentence."""
    problems = []
    listed: dict[int, list[int]] = {}  # contribution -> the versions whose fusion record lists it
    versions = {r["id"]: r for r in db.execute("SELECT id, parent, fusion, abandoned, held_back FROM versions")}
    for v in versions.values():
        fusion = json.loads(v["fusion"]) if v["fusion"] else {}
        for c in fusion.get("contributions", []):
            listed.setdefault(c, []).append(v["id"])
        parent = versions.get(v["parent"], {"abandoned": None, "held_back": None})
        for state in ("abandoned", "held_back"):
            if parent[state] and not v["abandoned"]:
                problems.append(f"lineage: version {v['id']} builds on {state.replace('_', '-')} version {v['parent']}")
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
    payloads: dict[tuple, list[int]] = {}
    for r in db.execute("SELECT id, sha256, contributor, base_version FROM contributions WHERE abandoned IS NULL "
                        "AND requeued_from IS NULL "
                        "ORDER BY id"):
        payloads.setdefault((r["sha256"], r["contributor"], r["base_version"]), []).append(r["id"])
    for (_, contributor, base), ids in payloads.items():
        if len(ids) > 1:
            problems.append(f"lineage: contributions {','.join(map(str, ids))} are the same payload from "
                            f"{contributor} against version {base} (a duplicate)")
    return problems
