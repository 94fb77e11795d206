"""A fusion in the repository: select among the waiting contributions (admission, intake.py,
has checked each one already; here a contributor counts once and the staleness rules apply),
decode the encoded ones, rebase the stale ones onto the current base, fuse what passed, take
the outer optimizer's step if one is set, and record all of it (refusals with their
reasons, the optimizer's momentum buffer) in one index transaction."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from coldfusion.encodings import decode_contribution
from coldfusion.fusion import fuse_files, get_operator
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors, load_tensors, save_tensors
from coldfusion.io.model_files import sha256_file
from coldfusion.io.storage.index import IndexConflict
from coldfusion.io.tensorfile import SafetensorsReader
from coldfusion.repository.outer import OuterSettings, outer_step
from coldfusion.repository.validation import ValidationSettings, inspect_contribution

if TYPE_CHECKING:
    from coldfusion.repository.store import Contribution, Repository, Version

DECODED_PREFIX = ".decoded-"  # scratch directories of a fusion in progress (in the repository's root)


def _settled(c: Contribution) -> str:
    """Why a contribution can no longer be fused."""
    if c.fused_into is not None:
        return f"was already fused into version {c.fused_into}"
    return f"was refused ({c.rejected})" if c.rejected else f"was abandoned ({c.abandoned})"


def fuse_contributions(
    repo: Repository, base_version: int, contribution_ids: Sequence[int], *, method: str = "average",
    params: dict | None = None, run: str | None = None, iteration: int | None = None,
    run_id: str | None = None, missing: dict[str, str] | None = None, declined: dict[str, str] | None = None,
    validation: ValidationSettings | None = None, outer: OuterSettings | None = None, onto_newest: bool = False,
) -> Version:
    """Validate the contributions, fuse those that pass into a new version whose parent is
    `base_version`. A contribution is fused at most once, never once refused or
    abandoned, and a run's contributions only by that run (`run_id`). `missing`
    (contributor -> reason) records the chosen contributors that sent nothing, `declined`
    those that chose not to train on the base. Refused contributions keep their reason
    in the index and in the version's fusion record; with fewer than
    `validation.min_accepted` left, nothing is fused and the error lists every reason.
    `outer` steps from the base towards the fused body with momentum (repository/outer.py); its
    buffer continues the one stored with `base_version`, if that version has one.
    `onto_newest`: fuse only while `base_version` is the newest version in use (the service,
    whose replicas may fuse at the same time: the lineage stays one line).
    """
    params, validation = params or {}, validation or ValidationSettings()
    op = get_operator(method)
    op.check_params(params)  # a typo fails before anything is read
    base = repo.version(base_version)
    if not base.live:
        why = base.abandoned or base.held_back
        raise ColdFusionError(f"version {base.id} is {base.status.replace('_', ' ')} ({why}); fuse onto a live version")
    repeated = sorted(c for c, n in Counter(contribution_ids).items() if n > 1)
    if repeated:
        raise ColdFusionError(f"contributions {repeated} are listed more than once")
    with repo._db() as db:
        contribs = [repo._contribution_row(db, c) for c in contribution_ids]
    settled = [f"contribution {c.id} {_settled(c)}" for c in contribs if not c.waiting]
    settled += [f"contribution {c.id} was sent to run {c.run_id}, which fuses or abandons it itself (resume "
                "that run)" for c in contribs if c.waiting and c.run_id is not None and c.run_id != run_id]
    if settled:
        raise ColdFusionError("the lineage is not rewritten: " + "; ".join(settled))
    # Encoded contributions are decoded here, into files deleted after the fusion.
    behind = _staleness(repo, base, contribs)
    with tempfile.TemporaryDirectory(dir=repo.root, prefix=DECODED_PREFIX) as scratch:
        rejected, norms, dense = _validate(repo, base, contribs, validation, Path(scratch), behind)
        accepted = [c for c in contribs if c.id not in rejected]
        if len(accepted) < validation.min_accepted:
            with repo._db() as db:
                repo._mark_rejected(db, rejected)
            reasons = "; ".join(f"contribution {cid}: {why}" for cid, why in rejected.items())
            raise ColdFusionError(f"only {len(accepted)} of {len(contribs)} contributions passed validation, "
                                  f"fewer than min_accepted = {validation.min_accepted}: {reasons}")
        stale = [c for c in accepted if c.base_version != base.id]
        current = repo.load(base.sha256) if stale else None  # once, for every stale contribution
        own_bases: dict[int, Tensors] = {}  # each older base read once, however many were trained from it
        moved = {c.id: _rebase(repo, c, dense[c.id], current, own_bases) for c in stale}  # indexed with the version
        rebased = {c.id: {"from_version": c.base_version, "sha256": moved[c.id][0]} for c in stale}
        weights = [c.num_examples for c in accepted] if op.weighting == "examples" else None
        if validation.staleness_exponent > 0 and any(behind[c.id] != 0 for c in accepted):
            depth = len(repo.lineage(base.id))
            weights = [w * _staleness_weight(behind[c.id], validation.staleness_exponent, depth)
                       for w, c in zip(weights or [1.0] * len(accepted), accepted, strict=True)]
        stats = None
        if op.needs_stats:
            lacking = [c.id for c in accepted if op.needs_stats not in c.stats]
            if lacking:
                raise ColdFusionError(f"fusion method '{method}' needs {op.needs_stats} statistics, which "
                                      f"contributions {lacking} did not send")
            stats = [repo.path_of(c.stats[op.needs_stats]) for c in accepted]
        bodies = [repo.path_of(rebased[c.id]["sha256"]) if c.id in rebased else dense[c.id] for c in accepted]
        previous = ((base.fusion or {}).get("outer") or {}).get("momentum_buffer")  # None: the buffer starts at 0
        fused, buffer = fuse_step(bodies, repo.path_of(base.sha256), method, params, weights=weights, stats=stats,
                                  norms=[norms[c.id] for c in accepted], outer=outer,
                                  momentum=repo.load(previous) if previous else None, base_tensors=current)
    outer_record = {}
    if outer is not None and not outer.is_plain:
        outer_record = {"outer": {**outer.model_dump(), "momentum_from": base.id if previous else None}}
    fusion = {"method": method, "params": params, "contributions": [c.id for c in accepted],
              "delta_norms": {str(c.id): round(norms[c.id], 6) for c in accepted},
              **({"missing": missing} if missing else {}),
              **({"declined": declined} if declined else {}),
              **({"rejected": {str(k): v for k, v in rejected.items()}} if rejected else {}),
              **({"rebased": {str(k): v for k, v in rebased.items()}} if rebased else {}),
              **({"staleness": {str(c.id): behind[c.id] for c in accepted}} if rebased else {}),
              **({"weights": {str(c.id): round(w, 6) for c, w in zip(accepted, weights, strict=True)}}
                 if weights else {}), **outer_record}
    stored, stored_buffer = repo._put(fused), None if buffer is None else repo._put(buffer)
    try:
        with repo._db() as db:
            if onto_newest:
                newest = db.execute("SELECT MAX(id) FROM versions WHERE abandoned IS NULL AND held_back IS NULL"
                                    ).fetchone()[0]
                if newest != base.id:
                    raise IndexConflict(f"version {base.id} is no longer the newest (version {newest} was fused "
                                        "since)")
            if stored_buffer is not None:
                fusion["outer"]["momentum_buffer"] = repo._index(db, stored_buffer)
            for stored_rebase in moved.values():
                repo._index(db, stored_rebase)
            sha = repo._index(db, stored)
            version = repo._insert_version(db, sha, base.model_source, base.id, fusion, run, iteration, run_id,
                                           base.model)
            for c in accepted:  # only while still waiting: another replica may have fused it since it was read
                taken = db.execute("UPDATE contributions SET fused_into = ? WHERE id = ? AND fused_into IS NULL "
                                   "AND rejected IS NULL AND abandoned IS NULL", (version.id, c.id)).rowcount
                if taken != 1:
                    raise IndexConflict(f"contribution {c.id} is no longer waiting")
            repo._mark_rejected(db, rejected)
    except IndexConflict as exc:  # another fusion (another replica) got there first
        raise ColdFusionError(f"nothing was fused: {exc}; another fusion got there first") from None
    return version


def fuse_step(bodies: Sequence[Path], base: Path, method: str, params: dict, *,
              weights: Sequence[float] | None = None, stats: Sequence[Path] | None = None,
              norms: Sequence[float] | None = None, outer: OuterSettings | None = None,
              momentum: Tensors | None = None, base_tensors: Tensors | None = None) -> tuple[Tensors, Tensors | None]:
    """One fusion, and nothing else: bodies (files, in order), their weights, statistics and
    delta norms, the base they are fused onto, the method and its parameters, the outer
    optimizer and its momentum buffer -> (the next base, the next buffer). The repository and
    Flower's `ColdFusionStrategy` both call it, so the same inputs give the same bytes.
    `base_tensors`: the base, if the caller has read it already."""
    op = get_operator(method)
    fused = fuse_files(bodies, method, weights, base=base if op.needs_base else None, stats=stats,
                       norms=norms if op.needs_norms else None, **params)
    if outer is None or outer.is_plain:
        return fused, None
    return outer_step(base_tensors if base_tensors is not None else load_tensors(base), fused, momentum, outer)


def _staleness(repo: Repository, base: Version, contribs: list[Contribution]) -> dict[int, int | None]:
    """How many versions each contribution's base is behind `base` along its lineage (0: it is
    `base`; None: its base is not an ancestor of `base`)."""
    ancestors = {v.id: i for i, v in enumerate(repo.lineage(base.id))}
    return {c.id: ancestors.get(c.base_version) for c in contribs}


def _staleness_weight(behind: int | None, exponent: float, depth: int) -> float:
    """(1 + s)^-a; a base outside the lineage counts as the oldest there is (`depth` behind)."""
    return (1 + (depth if behind is None else behind)) ** -exponent


def _validate(repo: Repository, base: Version, contribs: list[Contribution], settings: ValidationSettings,
              scratch: Path, behind: dict[int, int | None]) -> tuple[dict[int, str], dict[int, float], dict[int, Path]]:
    """(contribution id -> why it is refused, -> its delta norm, -> the file of its body:
    the stored one, or for an encoded contribution its decoding, written into `scratch`).
    Admission (intake.py) checked each body against its base; what is left depends on this
    fusion: one contribution per contributor, the staleness rules, and stored files that
    still match their checksums."""
    rejected, norms, dense = {}, {}, {}
    bases: dict[int, Tensors] = {}  # each base an encoded contribution needs, read (and hashed) once
    if sha256_file(repo.path_of(base.sha256)) != base.sha256:
        raise ColdFusionError(f"base version {base.id} ({repo.path_of(base.sha256)}) does not match its "
                              "checksum: the repository is damaged; run `coldfusion verify` on it")
    for c in contribs:
        if settings.max_staleness is not None and (behind[c.id] is None or behind[c.id] > settings.max_staleness):
            where = (f"{behind[c.id]} versions behind" if behind[c.id] is not None
                     else "not an ancestor of")
            rejected[c.id] = (f"stale: trained from version {c.base_version}, {where} the current base {base.id} "
                              f"(validation.max_staleness = {settings.max_staleness})")
        elif c.base_version != base.id and settings.stale == "reject":
            rejected[c.id] = (f"stale: trained from version {c.base_version}, not the current base "
                              f"{base.id} (validation.stale = reject)")
    # a contributor counts once: with its newest contribution of those the staleness rules let through
    newest = {c.contributor: c.id for c in sorted(contribs, key=lambda c: c.id) if c.id not in rejected}
    for c in contribs:
        if c.id not in rejected and newest[c.contributor] != c.id:
            rejected[c.id] = (f"superseded: {c.contributor} counts once per fusion, with its newest contribution "
                              f"{newest[c.contributor]}")
    for c in contribs:
        if c.id in rejected:
            continue
        path = repo.path_of(c.sha256)
        if not path.exists() or sha256_file(path) != c.sha256:
            rejected[c.id] = f"its file {path.name} is missing or does not match its checksum"
            continue
        own_base = base if c.base_version == base.id else repo.version(c.base_version)
        if c.encoding.get("kind", "full") != "full":
            try:
                if own_base.id not in bases:
                    bases[own_base.id] = repo.load(own_base.sha256)
                path = _decode(repo, c, bases[own_base.id], scratch)
            except ColdFusionError as exc:
                rejected[c.id] = f"its {c.encoding.get('kind')} encoding cannot be decoded: {exc}"
                continue
        dense[c.id] = path
        if c.delta_norm is not None:
            norms[c.id] = c.delta_norm
            continue
        with SafetensorsReader([path]) as body, SafetensorsReader([repo.path_of(own_base.sha256)]) as b:
            found = inspect_contribution(body, b)  # admitted before admission measured it: inspected here
        if found.problem:
            rejected[c.id] = found.problem
        else:
            norms[c.id] = found.delta_norm
    return rejected, norms, dense

def _decode(repo: Repository, contribution: Contribution, own_base: Tensors, scratch: Path) -> Path:
    """Write the body an encoded contribution stands for (on `own_base`, the tensors of the
    version it was trained from) into `scratch`; return its path."""
    payload = load_tensors(repo.path_of(contribution.sha256))  # its checksum was just verified
    body = decode_contribution(payload, contribution.encoding, own_base)
    path = scratch / f"{contribution.id}.safetensors"
    save_tensors(path, body)
    return path

def _rebase(repo: Repository, contribution: Contribution, body_path: Path, current: Tensors,
            own_bases: dict[int, Tensors]) -> tuple[str, int]:
    """Write `current + (body - the base it was trained from)`, the stale contribution's
    update carried onto the current base (`own_bases`: the older bases read so far, by id);
    return what `_put` returns, for the fusion's transaction to index."""
    if contribution.base_version not in own_bases:
        own_bases[contribution.base_version] = repo.load_version(contribution.base_version)
    body, own_base = load_tensors(body_path), own_bases[contribution.base_version]
    moved = {k: (current[k] + (v - own_base[k])).to(v.dtype) if v.is_floating_point() else v
             for k, v in body.items()}
    return repo._put(moved)
