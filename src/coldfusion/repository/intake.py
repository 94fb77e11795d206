"""Admission: the one way a contribution enters a repository, whatever door it came through
(the loop and its Flower engine, `coldfusion contribute`, `push` over HTTP, Flower's strategy).

The payload is read once as received and hashed once; its format is checked (safetensors
header, tensor byte ranges laid end to end over the data); its encoding is decoded once
against the base it claims; the body it stands for is inspected once against that base
(validation.py); and the operator's rules are applied: a live base, a real update (not a
no-op), a bounded delta norm, no duplicate of an admitted payload (whatever base it claims),
at most `max_examples` examples. An admitted contribution is stored as received, with its
delta norm, and waits to be fused. A refused one stores nothing but a row of the index's
`refusals` table (the rule and the reason) and raises `Refused`, whose message names the rule.

The fusion that follows only selects, rebases, fuses and records (fusion_pipeline.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.names import check_name
from coldfusion.io.checkpoint import Tensors, serialize, sha256_bytes
from coldfusion.io.tensorfile import header_of_bytes
from coldfusion.repository.validation import InMemory, ValidationSettings, inspect_contribution, norm_problem

if TYPE_CHECKING:
    from coldfusion.repository.store import Contribution, Repository, Version

FULL = {"kind": "full"}


class Refused(ColdFusionError):
    """Admission refused a contribution; `rule` names the rule it broke."""

    def __init__(self, rule: str, reason: str, refusal: int | None = None):
        super().__init__(f"refused ({rule}): {reason}")
        self.rule, self.reason, self.refusal = rule, reason, refusal


@dataclass(frozen=True)
class Claim:
    """What the sender says of its payload."""

    contributor: str
    task: str
    base: int | str  # a version reference (refs.py); 'latest' is the newest live version
    examples: int
    encoding: dict = field(default_factory=lambda: dict(FULL))
    metrics: dict = field(default_factory=dict)
    run_id: str | None = None


@dataclass(frozen=True)
class Refusal:
    """A row of the `refusals` table."""

    id: int
    contributor: str
    task: str | None
    base: str | None
    num_examples: int | None
    sha256: str | None
    rule: str
    reason: str
    run_id: str | None
    created: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def refuse(repo: Repository, claim: Claim, rule: str, reason: str, sha256: str | None = None) -> Refused:
    """Record a refusal (nothing else is stored) and return the error to raise."""
    with repo._db() as db:
        refusal = db.execute(
            "INSERT INTO refusals (contributor, task, base, num_examples, sha256, rule, reason, run_id, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (claim.contributor, claim.task, str(claim.base)[:80], claim.examples, sha256, rule, reason[:2000],
             claim.run_id, _now())).fetchone()[0]
    return Refused(rule, reason, refusal)


def admit(repo: Repository, payload: Path | bytes | Tensors, claim: Claim, rules: ValidationSettings | None = None,
          stats: dict[str, Tensors] | None = None) -> Contribution:
    """Admit `payload` (a file as received, its bytes, or tensors) as a contribution waiting
    to be fused, or record why not and raise `Refused`."""
    rules = rules or ValidationSettings()
    check_name(claim.contributor, "contributor")  # unnamed senders are not recorded: the name is the record's key
    try:
        check_name(claim.task, "task")
    except ColdFusionError as exc:
        raise refuse(repo, claim, "name", str(exc)) from None
    try:
        check_examples(claim.examples, rules)
    except Refused as exc:
        raise refuse(repo, claim, exc.rule, exc.reason) from None
    base = _live_base(repo, claim)
    data = payload if isinstance(payload, bytes) else Path(payload).read_bytes() if isinstance(payload, Path) \
        else serialize(payload)
    sha = sha256_bytes(data)
    _refuse_duplicate(repo, claim, sha)  # before any decoding: a copy costs nothing more
    history = _admitted_norms(repo, base, rules.norm_history)
    try:
        examined = examine(data, claim.encoding, repo.load(base.sha256), history, rules)
    except Refused as exc:
        raise refuse(repo, claim, exc.rule, f"against version {base.id}: {exc.reason}", sha) from None
    return _store(repo, data, sha, claim, base.id, examined.delta_norm, stats)


@dataclass(frozen=True)
class Examined:
    """A payload that passed `examine`: the body it stands for, and how far it moved."""

    body: Tensors
    delta_norm: float


def examine(data: bytes, encoding: dict, base: Tensors, admitted_norms: list[float],
            rules: ValidationSettings) -> Examined:
    """The checks of a payload's bytes that need no index: its format, its decoding against
    `base` (the tensors of the version it claims), the body against that base, the norm rules
    (`admitted_norms`: the delta norms admitted before it, newest first). Raises `Refused`
    (nothing recorded: `admit` records; Flower's strategy keeps no record)."""
    from safetensors.torch import load

    try:
        header_of_bytes(data)
        payload = load(data)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        raise Refused("format", f"not a valid safetensors file: {exc}") from None
    kind = encoding.get("kind", "full")
    body = payload
    if kind != "full":
        from coldfusion.encodings import decode_contribution

        try:
            body = decode_contribution(payload, encoding, base)
        except (ColdFusionError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise Refused("encoding", f"its {kind} encoding cannot be decoded: {exc}") from None
    found = inspect_contribution(InMemory(body), InMemory(base))
    if found.problem:
        raise Refused(found.rule, found.problem)
    problem = norm_problem(found.delta_norm, admitted_norms, found.base_norm, rules)
    if problem:
        raise Refused("no-op" if found.delta_norm == 0 else "norm", problem)
    return Examined(body, found.delta_norm)


def check_examples(examples, rules: ValidationSettings) -> None:
    """The declared example count: an int from 1 to the operator's cap (it weighs `weighted` fusion)."""
    if type(examples) is not int or not 1 <= examples <= rules.max_examples:
        raise Refused("examples", f"{examples!r} examples: declare between 1 and the operator's cap max_examples = "
                                  f"{rules.max_examples}")


def _store(repo: Repository, data: bytes, sha: str, claim: Claim, base_version: int, delta_norm: float,
           stats: dict[str, Tensors] | None) -> Contribution:
    """Write the payload as received (and its statistics), then index it, unless an admitted
    twin was indexed meanwhile (checked inside the transaction: replicas take turns there)."""
    repo.object_store.put(f"{sha}.safetensors", data)
    stats_stored = {kind: repo._put(t) for kind, t in (stats or {}).items()}
    with repo._db() as db:
        if _twin(db, sha, claim.run_id) is None:
            repo._index(db, (sha, len(data)))
            stat_shas = {kind: repo._index(db, written) for kind, written in stats_stored.items()}
            new_id = db.execute(
                "INSERT INTO contributions (sha256, base_version, contributor, task, num_examples, metrics, stats, "
                "created, encoding, run_id, delta_norm) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (sha, base_version, claim.contributor, claim.task, claim.examples, json.dumps(claim.metrics),
                 json.dumps(stat_shas), _now(), json.dumps(claim.encoding), claim.run_id, delta_norm),
            ).fetchone()[0]
            return repo._contribution_row(db, new_id)
    _refuse_duplicate(repo, claim, sha)
    raise AssertionError("unreachable: a twin was found")


def _twin(db, sha: str, run_id: str | None):
    """The admitted contribution (waiting or fused, not abandoned) whose payload has checksum
    `sha`, among those of the same run (or, for `run_id` None, those sent from outside runs:
    runs that share a repository may retrain the same body on their own lineages)."""
    return db.execute("SELECT id, contributor, base_version FROM contributions WHERE sha256 = ? AND rejected IS NULL "
                      "AND abandoned IS NULL AND COALESCE(run_id, '') = COALESCE(?, '') ORDER BY id LIMIT 1",
                      (sha, run_id)).fetchone()


def _refuse_duplicate(repo: Repository, claim: Claim, sha: str) -> None:
    with repo._db() as db:
        twin = _twin(db, sha, claim.run_id)
    if twin is not None:
        same = "it" if twin["contributor"] == claim.contributor else "another contributor"
        raise refuse(repo, claim, "duplicate", f"the same payload (sha256 {sha[:12]}...) as contribution {twin['id']}, "
                                               f"which {same} sent against version {twin['base_version']}; a payload "
                                               "is admitted once, whatever base it claims", sha)


def _live_base(repo: Repository, claim: Claim) -> Version:
    try:
        base = repo.resolve(claim.base)
    except ColdFusionError as exc:
        raise refuse(repo, claim, "base", str(exc)) from None
    if not base.live:
        raise refuse(repo, claim, "base", f"version {base.id} is {base.status.replace('_', ' ')} "
                                          f"({base.abandoned or base.held_back}); train on a live version (latest)")
    return base


def _admitted_norms(repo: Repository, base: Version, limit: int) -> list[float]:
    """Delta norms of the latest contributions admitted along `base`'s lineage, newest first."""
    lineage = [v.id for v in repo.lineage(base.id)]
    with repo._db() as db:
        rows = db.execute(f"SELECT delta_norm FROM contributions WHERE base_version IN ({','.join('?' * len(lineage))})"
                          " AND delta_norm IS NOT NULL AND rejected IS NULL AND abandoned IS NULL"
                          " AND requeued_from IS NULL ORDER BY id DESC "
                          "LIMIT ?", (*lineage, limit)).fetchall()
    return [r[0] for r in rows]
