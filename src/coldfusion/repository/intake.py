"""Admission: the one way a contribution enters a repository, whatever door it came through
(the loop and its Flower engine, `coldfusion contribute`, `push` over HTTP, Flower's strategy).

The payload is read once as received and hashed once; its format is checked (safetensors
header, tensor byte ranges laid end to end over the data); its encoding is decoded once
against the base it claims; the body it stands for is inspected once against that base
(validation.py); and the operator's rules are applied: a live base, a real update (not a
no-op), a bounded delta norm, no duplicate of an admitted payload (whatever base it claims;
within a run, or among the uploads from outside runs), at most `max_examples` examples. An
admitted contribution is stored as received, with its delta norm, and waits to be fused. A
refused one stores nothing but a row of the index's `refusals` table (the rule and the
reason) and raises `Refused`, whose message names the rule.

The fusion that follows only selects, rebases, fuses and records (fusion_pipeline.py).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.names import check_name
from coldfusion.io.checkpoint import Tensors, serialize, sha256_bytes
from coldfusion.io.tensorfile import DTYPES, SafetensorsReader, header_of_bytes, parse_header
from coldfusion.repository.validation import (
    InMemory,
    Inspection,
    Inspector,
    ValidationSettings,
    inspect_contribution,
    norm_problem,
)

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
            (claim.contributor, str(claim.task)[:100], str(claim.base)[:80],
             claim.examples if type(claim.examples) is int and 0 <= claim.examples < 2**63 else None, sha256, rule,
             reason[:2000], claim.run_id, _now())).fetchone()[0]
    return Refused(rule, reason, refusal)


@dataclass(frozen=True)
class Received:
    """An upload this process received into a file of its own, hashed as it arrived, and for a
    full body inspected as it arrived too (`inspection`, against the version of that checksum):
    admission then does not read it again, and stores it by moving it (the file is gone after)."""

    path: Path
    sha256: str
    inspection: tuple[str, Inspection] | None = None  # (the base's checksum, what was found)


class StreamedInspection:
    """Admission's inspection of a full body while its bytes arrive: the header once it is in
    (checked as every safetensors header is, against the declared size), then each tensor as
    its bytes complete, in file order. `feed` returns the tensors a chunk completed; the caller
    runs `check` on them (in a worker thread when they are large: it computes), and `result`
    once all arrived."""

    def __init__(self, base: Version, base_tensors: Tensors, size: int):
        self.base_sha, self.size = base.sha256, size
        self.inspector = Inspector(InMemory(base_tensors), _BASE_NORMS.get(base.sha256))
        self.head, self.received = bytearray(), 0
        self.pending: list[tuple[str, int, int, str, list[int]]] | None = None  # by offset: name, start, stop, ...
        self.current: bytearray | None = None

    def feed(self, chunk: bytes) -> list[tuple[str, torch.Tensor]]:
        self.received += len(chunk)
        if self.inspector.found is not None:
            return []
        if self.pending is None:
            self.head += chunk
            if not self._parse_header():
                return []
            chunk, self.head = bytes(self.head[8 + self._header_size:]), bytearray()
        done = []
        view = memoryview(chunk)
        while self.pending:
            name, start, stop, dtype, shape = self.pending[0]
            if self.current is None:
                self.current = bytearray()
            take = min(stop - start - len(self.current), len(view))
            self.current += view[:take]
            view = view[take:]
            if len(self.current) < stop - start:
                break
            values = torch.frombuffer(self.current, dtype=DTYPES[dtype]) if stop > start else \
                torch.empty(0, dtype=DTYPES[dtype])
            done.append((name, values.reshape(shape)))
            self.pending.pop(0)
            self.current = None
        return done

    def _parse_header(self) -> bool:
        """Whether the header is in (and parsed: a bad one is the fault found)."""
        if len(self.head) < 8 or len(self.head) < 8 + int.from_bytes(self.head[:8], "little"):
            if len(self.head) >= 8 and int.from_bytes(self.head[:8], "little") > self.size:
                self.inspector.found = Inspection("the upload: its header claims more bytes than it has",
                                                  rule="format")
            return False
        head = bytes(self.head)
        try:
            self._header_size, header = parse_header(lambda n, at: head[at:at + n], self.size)
        except ValueError as exc:
            self.inspector.found = Inspection(f"the upload: not a readable safetensors file ({exc})", rule="format")
            return False
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        self.inspector.layout({k: (DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in tensors.items()})
        self.pending = sorted(((k, *v["data_offsets"], v["dtype"], v["shape"]) for k, v in tensors.items()),
                              key=lambda t: (t[1], t[2]))
        return True

    def check(self, ready: list[tuple[str, torch.Tensor]]) -> None:
        """Check the tensors `feed` returned."""
        for name, values in ready:
            self.inspector.tensor(name, values)

    def result(self) -> tuple[str, Inspection]:
        """(the base's checksum, what was found), once the last byte arrived."""
        found = self.inspector.found
        if found is None and (self.received != self.size or self.pending):
            found = Inspection(f"the upload: {self.received} bytes arrived, its header and length say {self.size}",
                               rule="format")
        return self.base_sha, found or self.inspector.result()


def start_inspection(repo: Repository, claim: Claim, size: int | None) -> StreamedInspection | None:
    """An inspection to run while a full body of `size` bytes arrives against the base `claim`
    names, or None (an encoded payload, no declared size, a base admission will refuse anyway):
    admission then reads the file itself."""
    if claim.encoding.get("kind", "full") != "full" or not size:
        return None
    try:
        base = repo.resolve(claim.base)
    except ColdFusionError:
        return None
    return StreamedInspection(base, _base_tensors(repo, base), size) if base.live else None


def admit(repo: Repository, payload: Received | bytes | Tensors, claim: Claim,
          rules: ValidationSettings | None = None, stats: dict[str, Tensors] | None = None) -> Contribution:
    """Admit `payload` (an upload received into a file, its bytes, or tensors) as a
    contribution waiting to be fused, or record why not and raise `Refused`."""
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
    if isinstance(payload, Received):
        data, sha = payload, payload.sha256
    else:
        data = payload if isinstance(payload, bytes) else serialize(payload)
        sha = sha256_bytes(data)
    _refuse_duplicate(repo, claim, sha)  # before any decoding: a copy costs nothing more
    history = _admitted_norms(repo, base, rules.norm_history)
    streamed = data.inspection if isinstance(data, Received) and data.inspection else (None, None)
    try:
        if streamed[0] == base.sha256 and claim.encoding.get("kind", "full") == "full":
            examined = judge(streamed[1], history, rules)  # inspected as it arrived: not read again
        else:
            examined = examine(data.path if isinstance(data, Received) else data, claim.encoding,
                               _base_tensors(repo, base), history, rules, base_norm=_BASE_NORMS.get(base.sha256))
    except Refused as exc:
        raise refuse(repo, claim, exc.rule, f"against version {base.id}: {exc.reason}", sha) from None
    _BASE_NORMS[base.sha256] = examined.base_norm
    return _store(repo, data, sha, claim, base.id, examined.delta_norm, stats)


# The bases admission reads, by checksum (content-addressed, so never stale) and only for
# reading: a service checks every upload against the same few versions. Two at most: each
# is a whole body in memory.
_BASES: OrderedDict[str, Tensors] = OrderedDict()
_BASE_NORMS: dict[str, float] = {}
_BASES_LOCK = threading.Lock()


def _base_tensors(repo: Repository, base: Version) -> Tensors:
    with _BASES_LOCK:
        if base.sha256 in _BASES:
            _BASES.move_to_end(base.sha256)
            return _BASES[base.sha256]
    tensors = repo.load(base.sha256)  # checked against its checksum once
    with _BASES_LOCK:
        _BASES[base.sha256] = tensors
        while len(_BASES) > 2:
            _BASES.popitem(last=False)
    return tensors


@dataclass(frozen=True)
class Examined:
    """A payload that passed `examine`: the body it stands for, and how far it moved."""

    body: Tensors | None  # None for a full body read from a file (it was inspected tensor by tensor)
    delta_norm: float
    base_norm: float


def examine(data: bytes | Path, encoding: dict, base: Tensors, admitted_norms: list[float],
            rules: ValidationSettings, base_norm: float | None = None) -> Examined:
    """The checks of a payload (its bytes, or a file) that need no index: its format, its
    decoding against `base` (the tensors of the version it claims), the body against that
    base, the norm rules (`admitted_norms`: the delta norms admitted before it, newest first;
    `base_norm`, if the caller knows it). Raises `Refused` (nothing recorded: `admit` records;
    Flower's strategy keeps no record). A full body in a file is read tensor by tensor, once."""
    from safetensors.torch import load

    kind = encoding.get("kind", "full")
    with ExitStack() as stack:
        try:
            if isinstance(data, Path):
                reader = stack.enter_context(SafetensorsReader([data], label="the upload"))
                payload = reader if kind == "full" else {k: reader.get_tensor(k) for k in sorted(reader.keys())}
            else:
                header_of_bytes(data)
                payload = load(data)
        except ColdFusionError as exc:  # our reader's message names the rule broken
            raise Refused("format", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own SafetensorError)
            raise Refused("format", f"not a valid safetensors file: {exc}") from None
        body = payload
        if kind != "full":
            from coldfusion.encodings import decode_contribution

            try:
                body = decode_contribution(payload, encoding, base)
            except (ColdFusionError, KeyError, ValueError, RuntimeError, TypeError) as exc:
                raise Refused("encoding", f"its {kind} encoding cannot be decoded: {exc}") from None
        try:
            found = inspect_contribution(body if isinstance(body, SafetensorsReader) else InMemory(body),
                                         InMemory(base), base_norm)
        except ColdFusionError as exc:  # a tensor shorter than its header says
            raise Refused("format", str(exc)) from None
    return judge(found, admitted_norms, rules, None if isinstance(body, SafetensorsReader) else body)


def judge(found: Inspection, admitted_norms: list[float], rules: ValidationSettings,
          body: Tensors | None = None) -> Examined:
    """The verdict on an inspection: the fault it found, or the norm rules; `Refused` if either."""
    if found.problem:
        raise Refused(found.rule, found.problem)
    problem = norm_problem(found.delta_norm, admitted_norms, found.base_norm, rules)
    if problem:
        raise Refused("no-op" if found.delta_norm == 0 else "norm", problem)
    return Examined(body, found.delta_norm, found.base_norm)


def check_examples(examples, rules: ValidationSettings) -> None:
    """The declared example count: an int from 1 to the operator's cap (it weighs `weighted` fusion)."""
    if type(examples) is not int or not 1 <= examples <= rules.max_examples:
        raise Refused("examples", f"{examples!r} examples: declare between 1 and the operator's cap max_examples = "
                                  f"{rules.max_examples}")


def _store(repo: Repository, data: Received | bytes, sha: str, claim: Claim, base_version: int, delta_norm: float,
           stats: dict[str, Tensors] | None) -> Contribution:
    """Write the payload as received (and its statistics), then index it, unless an admitted
    twin was indexed meanwhile (checked inside the transaction: replicas take turns there)."""
    if isinstance(data, Received):
        size = data.path.stat().st_size
        repo.object_store.put_file(f"{sha}.safetensors", data.path)
    else:
        size = len(data)
        repo.object_store.put(f"{sha}.safetensors", data)
    stats_stored = {kind: repo._put(t) for kind, t in (stats or {}).items()}
    with repo._db() as db:
        if _twin(db, sha, claim.run_id) is None:
            repo._index(db, (sha, size))
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
    with repo._read() as db:
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
    """Delta norms of the latest contributions admitted along `base`'s lineage (the base and its
    ancestors, walked in the same query), newest first."""
    with repo._read() as db:
        rows = db.execute("WITH RECURSIVE lineage(id, parent) AS (SELECT id, parent FROM versions WHERE id = ? "
                          "UNION ALL SELECT v.id, v.parent FROM versions v JOIN lineage l ON v.id = l.parent) "
                          "SELECT delta_norm FROM contributions WHERE base_version IN (SELECT id FROM lineage) "
                          "AND delta_norm IS NOT NULL AND rejected IS NULL AND abandoned IS NULL "
                          "AND requeued_from IS NULL ORDER BY id DESC LIMIT ?", (base.id, limit)).fetchall()
    return [r[0] for r in rows]
