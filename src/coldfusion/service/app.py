"""The HTTP API of the always-on repository (FastAPI).

    GET  /v1/versions                           every version: id, checksum, parent, fusion
    GET  /v1/versions/{ref}                     one (`latest`, an id, or a checksum prefix: refs.py)
    GET  /v1/versions/{ref}/body                its body (safetensors), X-Checksum-Sha256
    GET  /v1/versions/{ref}/tensors             the body's tensor names, dtypes and shapes
    GET  /v1/versions/{ref}/files               a Hugging Face directory of it: name -> sha256
    GET  /v1/versions/{ref}/files/{name}        one file of that directory
    GET  /                                      the web page: lineage graph, leaderboard, contributors
    GET  /v1/leaderboard                        versions, status, scores on the operator's suite
    GET  /v1/contributors                       each contributor's contributions and refusals
    GET  /v1/me                                 who the token belongs to           (token)
    POST /v1/contributors/{name}/contributions  upload a body: ?base=&task=&examples= (token of {name})
    GET  /v1/contributors/{name}/history        its contributions and refusals     (token of {name})

Reading versions is public, as a published model is; writing and a contributor's own
history need that contributor's token (`Authorization: Bearer ...`). An upload streams to
a scratch file with a size limit and a stall timeout, then goes through the repository's
one admission step (repository/intake.py, under the operator's `fusion.validation` rules):
stored as received if admitted (201, with its id), else 422 with the rule it broke. Every
refusal, these and the transport's own (413, 408), is recorded in the repository's index.
"""

import asyncio
import hashlib
import json
import logging
import shutil
import threading
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.model_files import sha256_file
from coldfusion.io.tensorfile import SafetensorsReader
from coldfusion.repository import Repository
from coldfusion.repository.intake import Claim, Received, Refused, StreamedInspection, refuse, start_inspection
from coldfusion.repository.refs import BadReference, parse_ref
from coldfusion.service.fuser import Fuser
from coldfusion.service.leaderboard import contributors, leaderboard
from coldfusion.service.settings import ServiceSettings
from coldfusion.service.suite import judged, published_latest
from coldfusion.service.tokens import ServiceStore

log = logging.getLogger("coldfusion.service")

INCOMING = ".incoming-"  # scratch files of uploads in progress (ROOT/service/)
INLINE_CHECK = 1 << 20  # tensor elements an upload's chunk may complete and be checked on the event loop
PAGE = Path(__file__).parent / "static" / "index.html"  # the lineage, leaderboard and contributors, live


def create_app(root: Path, settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    root = Path(root)
    Repository(root, create=False)  # fails now, with its reason, if there is no repository
    store = ServiceStore(root)
    scratch = root / "service"  # this replica's own: uploads in progress, exports
    scratch.mkdir(exist_ok=True)
    for stale in scratch.glob(INCOMING + "*"):  # uploads cut off by a crash were never acknowledged
        stale.unlink(missing_ok=True)
    exports = ExportCache(root)
    fuser = Fuser(root, settings.fusion, settings.suite) if settings.fusion.enabled else None
    if fuser is not None:
        from coldfusion.fusion import get_operator

        get_operator(settings.fusion.method).check_params(settings.fusion.params)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if fuser is not None:
            fuser.start()
        yield
        if fuser is not None:
            fuser.stop()

    app = FastAPI(title="coldfusion repository", lifespan=lifespan)

    def repository() -> Repository:  # one per request: SQLite connections stay in their thread
        return Repository(root, create=False)

    def contributor(authorization: str | None = Header(None)) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "a contributor token is needed: Authorization: Bearer <token> "
                                     "(the operator issues one with `coldfusion token issue`)",
                                headers={"WWW-Authenticate": "Bearer"})
        who = store.contributor_of(token.strip())
        if who is None:
            raise HTTPException(401, "this token is unknown or revoked; ask the operator for a new one",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def same_contributor(name: str, who: str) -> None:
        if name != who:
            raise HTTPException(403, f"this token belongs to {who}, not to {name}")

    def version_of(repo: Repository, ref: str):
        try:
            if parse_ref(ref).latest:  # with an operator's suite: the newest version it published
                return published_latest(repo, settings.suite is not None)
            return repo.version(ref)
        except BadReference as exc:
            raise HTTPException(422, str(exc)) from None
        except ColdFusionError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/v1/versions")
    def list_versions() -> list[dict]:
        return [describe(v) for v in repository().versions()]

    @app.get("/v1/versions/{ref}")
    def get_version(ref: str) -> dict:
        return describe(version_of(repository(), ref))

    @app.get("/v1/versions/{ref}/body")
    def get_body(ref: str) -> FileResponse:
        repo = repository()
        v = version_of(repo, ref)
        return FileResponse(repo.path_of(v.sha256), media_type="application/octet-stream",
                            filename=f"version-{v.id}.safetensors", headers={"X-Checksum-Sha256": v.sha256})

    @app.get("/v1/versions/{ref}/tensors")
    def get_tensors(ref: str) -> dict:
        repo = repository()
        v = version_of(repo, ref)
        with SafetensorsReader([repo.path_of(v.sha256)]) as body:
            layout = {k: body.layout(k) for k in sorted(body.keys())}
        return {"version": v.id,
                "tensors": {k: [str(d).removeprefix("torch."), list(s)] for k, (d, s) in layout.items()}}

    @app.get("/v1/versions/{ref}/files")
    def list_files(ref: str) -> dict:
        repo = repository()
        v = version_of(repo, ref)
        return {"version": v.id, "status": v.status, "held_back": v.held_back, "files": exports.files(repo, v.id)}

    @app.get("/v1/versions/{ref}/files/{name}")
    def get_file(ref: str, name: str) -> FileResponse:
        repo = repository()
        v = version_of(repo, ref)
        files = exports.files(repo, v.id)
        if name not in files:  # only names of the listing: no path reaches outside the export
            raise HTTPException(404, f"version {v.id} has no file {name!r}; its files: {sorted(files)}")
        return FileResponse(exports.path(v.id) / name, media_type="application/octet-stream",
                            headers={"X-Checksum-Sha256": files[name]})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/v1/leaderboard")
    def get_leaderboard() -> dict:
        return leaderboard(repository(), settings.suite is not None)

    @app.get("/v1/contributors")
    def get_contributors() -> list[dict]:
        return contributors(repository(), store)

    @app.get("/v1/me")
    def me(who: str = Depends(contributor)) -> dict:
        return {"contributor": who}

    @app.post("/v1/contributors/{name}/contributions", status_code=201)
    async def push(name: str, request: Request, base: str = Query(..., max_length=80,
                                                                  description="version it was trained from"),
                   task: str = Query(..., max_length=100), examples: int = Query(..., ge=1, le=10**15),
                   encoding: str = Query("{\"kind\": \"full\"}", max_length=2000,
                                         description="how the payload encodes the body (JSON of the encoding "
                                                     "settings: full, delta, sparse or lora)"),
                   who: str = Depends(contributor)) -> dict:
        same_contributor(name, who)
        claim = Claim(who, task, base, examples)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
            raise refused(claim, 413, "size", f"the upload is {int(length)} bytes, over the limit of "
                                              f"{settings.max_upload_bytes}")
        path = scratch / f"{INCOMING}{uuid.uuid4().hex}.safetensors"
        try:
            claim, inspection = await run_in_threadpool(
                completed_claim, claim, encoding, int(length) if length and length.isdigit() else None)
            received = await receive(request, path, claim, inspection)
            contribution = await run_in_threadpool(admit_upload, received, claim)
        except Refused as exc:  # admission recorded it
            raise HTTPException(422, str(exc)) from None
        except ColdFusionError as exc:
            raise refused(claim, 422, "request", str(exc)) from None
        except OSError as exc:  # the service's own disk (full, unwritable): nothing stored, the sender may retry
            log.error("could not store an upload from %s: %s", who, exc)
            raise HTTPException(507, f"the service could not store the upload ({exc.strerror}); "
                                     "nothing was stored, try again later") from None
        finally:
            path.unlink(missing_ok=True)
        return {"id": contribution.id, "sha256": contribution.sha256, "base_version": contribution.base_version,
                "status": "waiting"}

    def refused(claim: Claim, status: int, rule: str, reason: str) -> HTTPException:
        error = refuse(repository(), claim, rule, reason)
        return HTTPException(status, str(error))

    async def receive(request: Request, path: Path, claim: Claim, inspection: StreamedInspection | None) -> Received:
        """The request body into `path`, hashed (and with an `inspection`, inspected) as it
        arrives; refused past the size limit or after a stall."""
        chunks, size, digest = request.stream().__aiter__(), 0, hashlib.sha256()
        with open(path, "wb") as f:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), settings.read_timeout_seconds)
                except StopAsyncIteration:
                    return Received(path, digest.hexdigest(), inspection and inspection.result())
                except TimeoutError:
                    raise refused(claim, 408, "stalled", "the upload stalled: nothing arrived for "
                                                         f"{settings.read_timeout_seconds:g} seconds") from None
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise refused(claim, 413, "size", f"the upload passed the limit of {settings.max_upload_bytes} "
                                                      "bytes")
                f.write(chunk)
                digest.update(chunk)
                ready = inspection.feed(chunk) if inspection else []
                if sum(values.numel() for _, values in ready) > INLINE_CHECK:  # computing: not on the event loop
                    await run_in_threadpool(inspection.check, ready)
                elif ready:
                    inspection.check(ready)

    def completed_claim(claim: Claim, encoding: str, size: int | None) -> tuple[Claim, StreamedInspection | None]:
        """The claim with its encoding parsed and 'latest' resolved to the newest published
        version (a version not yet published is refused here, before the body is read), and
        the inspection to run while its `size` bytes arrive (if one applies)."""
        repo = repository()
        try:
            claim = replace(claim, encoding=parse_encoding(encoding))
        except ColdFusionError as exc:
            raise refuse(repo, claim, "encoding", str(exc)) from None
        if claim.base == "latest":  # with an operator's suite: the newest version it published
            claim = replace(claim, base=published_latest(repo, settings.suite is not None).id)
        elif settings.suite is not None:  # a version the suite has not ruled on is not published yet
            try:
                claimed = repo.resolve(claim.base)
            except ColdFusionError:
                claimed = None  # admission refuses it, naming the rule
            if claimed is not None and claimed.live and not judged(repo, claimed):
                raise refuse(repo, claim, "base", f"version {claimed.id} is not published yet (the operator's suite "
                                                  "has not ruled on it); train on a published version (latest)")
        return claim, start_inspection(repo, claim, size)

    def admit_upload(received: Received, claim: Claim):
        """The upload, as received, through the repository's admission step (which stores it
        by moving the file)."""
        return repository().add_contribution(received, base_version=claim.base, contributor=claim.contributor,
                                             task=claim.task, num_examples=claim.examples, encoding=claim.encoding,
                                             rules=settings.fusion.validation)

    def parse_encoding(text: str) -> dict:
        """The encoding's record (what decoding needs), from the settings' JSON."""
        from pydantic import ValidationError

        from coldfusion.encodings import EncodingSettings
        from coldfusion.infra.config_files import format_validation_error

        try:
            return EncodingSettings.model_validate(json.loads(text)).record()
        except (ValueError, TypeError) as exc:
            detail = format_validation_error(exc, "encoding") if isinstance(exc, ValidationError) else str(exc)
            raise ColdFusionError(f"the encoding is not valid JSON settings: {detail}") from None

    @app.get("/v1/contributors/{name}/history")
    def history(name: str, who: str = Depends(contributor)) -> dict:
        same_contributor(name, who)
        repo = repository()
        sent = [{"id": c.id, "created": c.created, "task": c.task, "base_version": c.base_version,
                 "examples": c.num_examples, "status": c.status, "fused_into": c.fused_into,
                 "requeued_as": c.requeued_as, "requeued_from": c.requeued_from, "reason": c.reason}
                for c in repo.contributions() if c.contributor == name]
        refusals = [{"id": r.id, "created": r.created, "rule": r.rule, "reason": r.reason, "task": r.task,
                     "base": r.base} for r in repo.refusals(name)]
        return {"contributor": name, "contributions": sent, "refused_uploads": refusals}

    return app


def describe(v) -> dict:
    fusion = v.fusion or {}
    return {"id": v.id, "sha256": v.sha256, "parent": v.parent, "created": v.created, "run": v.run,
            "method": fusion.get("method"), "contributions": fusion.get("contributions", []),
            "rejected": fusion.get("rejected", {}), "rebased": sorted(fusion.get("rebased", {})),
            "status": v.status, "abandoned": v.abandoned, "held_back": v.held_back}


class ExportCache:
    """Each version as a Hugging Face directory (coldfusion export), written when first asked
    for, under ROOT/service/exports/<id>/, with the checksum of every file. Only the `keep`
    most recently written stay (each is a whole model); an older one is written again if asked."""

    def __init__(self, root: Path, keep: int = 4):
        self.dir, self.keep = root / "service" / "exports", keep
        self.lock = threading.Lock()
        self._files: dict[int, dict[str, str]] = {}

    def path(self, version: int) -> Path:
        return self.dir / str(version)

    def files(self, repo: Repository, version: int) -> dict[str, str]:
        from coldfusion.repository.export import PROVENANCE_FILE, export_version

        with self.lock:
            if version not in self._files:
                out = self.path(version)
                if not (out / PROVENANCE_FILE).exists():
                    try:
                        export_version(repo, version, out, overwrite=True)
                    except ColdFusionError as exc:
                        raise HTTPException(409, f"version {version} cannot be exported: {exc}") from None
                    self._evict(keeping=out)
                listed = json.loads((out / PROVENANCE_FILE).read_text())["files"]
                self._files[version] = {**listed, PROVENANCE_FILE: sha256_file(out / PROVENANCE_FILE),
                                        "README.md": sha256_file(out / "README.md")}
            return self._files[version]

    def _evict(self, keeping: Path) -> None:
        exported = sorted((d for d in self.dir.iterdir() if d.is_dir() and d.name.isdigit() and d != keeping),
                          key=lambda d: d.stat().st_mtime, reverse=True)
        for old in exported[self.keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)
            self._files.pop(int(old.name), None)
