"""The contributor's side of `coldfusion serve`: pull a version, push a contribution.

Downloads are checked against the checksums the service sends and land atomically (a
directory appears whole or not at all). A model directory (a classifier saved by
transformers) is reduced to its body here, against the base's tensor names, so only a
body crosses the network.
"""

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.paths import cache_root
from coldfusion.io.checkpoint import staged_directory
from coldfusion.io.model_files import sha256_file

if TYPE_CHECKING:
    from coldfusion.encodings import EncodingSettings

TOKEN_ENV = "COLDFUSION_TOKEN"
CHUNK = 1 << 20


class ServiceClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise ColdFusionError(f"{url}: expected the service's address, e.g. http://127.0.0.1:8000")
        self.url = url.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _get(self, path: str, **kwargs) -> httpx.Response:
        return self._checked(lambda: self.http.get(path, **kwargs))

    def _checked(self, call) -> httpx.Response:
        try:
            response = call()
        except httpx.HTTPError as exc:
            raise ColdFusionError(f"{self.url}: the service cannot be reached ({exc})") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            raise ColdFusionError(f"{self.url} refused ({response.status_code}): {detail}")
        return response

    def version(self, ref: str = "latest") -> dict:
        return self._get(f"/v1/versions/{ref}").json()

    def versions(self) -> list[dict]:
        return self._get("/v1/versions").json()

    def me(self) -> str:
        if not self.token:
            raise ColdFusionError(f"a token is needed: pass --token or set {TOKEN_ENV}")
        return self._get("/v1/me").json()["contributor"]

    def outcome(self, who: str, contribution: int) -> dict:
        """What became of one of `who`'s contributions, following its requeues (a held-back
        fusion's contributions wait again as new ones): its history entry."""
        history = {c["id"]: c for c in self._get(f"/v1/contributors/{who}/history").json()["contributions"]}
        entry = history.get(contribution)
        while entry is not None and entry["status"] == "requeued" and entry.get("requeued_as") in history:
            entry = history[entry["requeued_as"]]
        if entry is None:
            raise ColdFusionError(f"{self.url} does not list contribution {contribution} of {who}")
        return entry

    def pull(self, ref: str, out: Path, overwrite: bool = False) -> dict:
        """Version `ref` as a Hugging Face directory at `out`; every file checked."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise ColdFusionError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
        listing = self._get(f"/v1/versions/{ref}/files").json()
        with staged_directory(out) as tmp:
            for name, sha in listing["files"].items():
                if Path(name).name != name or name.startswith("."):
                    raise ColdFusionError(f"{self.url} listed a file name that is not a plain name: {name!r}")
                self._download(f"/v1/versions/{listing['version']}/files/{name}", tmp / name, sha)
        return listing

    def pull_body(self, ref: str, out: Path) -> str:
        """The body of version `ref` as one safetensors file; its checksum. Bodies are kept in
        $COLDFUSION_CACHE/bodies by checksum: one pulled before (and still matching its
        checksum) is copied from there, not downloaded again."""
        meta = self.version(ref)
        cached = cache_root() / "bodies" / f"{meta['sha256']}.safetensors"
        if not (cached.is_file() and sha256_file(cached) == meta["sha256"]):
            cached.parent.mkdir(parents=True, exist_ok=True)
            self._download(f"/v1/versions/{meta['id']}/body", cached, meta["sha256"])
        out = Path(out)
        part = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.part")
        try:  # appears whole or not at all, as a download does
            shutil.copyfile(cached, part)
            part.replace(out)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise _unwritable(out, exc) from None
        return meta["sha256"]

    def _download(self, path: str, into: Path, sha256: str) -> None:
        digest = hashlib.sha256()
        tmp = into.with_name(f".{into.name}.{uuid.uuid4().hex[:12]}.part")  # several processes may share a cache
        try:
            with self.http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    self._checked(lambda: response)
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            raise ColdFusionError(f"{self.url}{path}: the download broke off ({exc})") from None
        except OSError as exc:  # a full disk, a read-only directory: say so, keep nothing half written
            tmp.unlink(missing_ok=True)
            raise _unwritable(into, exc) from None
        if digest.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise ColdFusionError(f"{self.url}{path}: the download does not match its checksum {sha256[:12]}; "
                                  "try again")
        tmp.replace(into)

    def push(self, body: Path, base: str, task: str, examples: int, encoding: "EncodingSettings | None" = None) -> dict:
        """Upload a body (a .safetensors file, or a model directory reduced to its body)
        trained from version `base`, encoded as `encoding` says (full: as it is; delta or
        sparse: against the base, downloaded for that); the service's reply (id, status)."""
        from coldfusion.encodings import EncodingSettings

        body, encoding = Path(body), encoding or EncodingSettings()
        if encoding.kind == "lora" or (encoding.kind == "sparse" and encoding.score == "fisher"):
            raise ColdFusionError(f"a {encoding.kind} contribution comes from training (LoRA adapters, a FISH "
                                  "mask), not from a finetuned body: push full, delta or sparse by magnitude")
        who = self.me()
        base_id = self.version(base)["id"]
        with tempfile.TemporaryDirectory() as scratch:
            if body.is_dir():
                body = self._body_of(body, base_id, Path(scratch))
            elif not body.is_file():
                raise ColdFusionError(f"{body}: no such file or directory")
            elif body.suffix != ".safetensors":
                raise ColdFusionError(f"{body}: push a .safetensors body or a model directory (pickles are not "
                                      "sent over the network)")
            if encoding.kind != "full":
                body = self._encode(body, base_id, encoding, Path(scratch))
            return self.upload(body, who, base_id, task, examples, encoding.record())

    def upload(self, payload: Path, who: str, base: int, task: str, examples: int, encoding: dict) -> dict:
        """Send a payload file as it is (`encoding`: the record of how it encodes the body)."""
        with open(payload, "rb") as f:
            return self._checked(lambda: self.http.post(
                f"/v1/contributors/{who}/contributions", content=_chunks(f),
                params={"base": base, "task": task, "examples": examples, "encoding": json.dumps(_settings(encoding))},
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(payload.stat().st_size)})).json()

    def _encode(self, body: Path, base: int, encoding, scratch: Path) -> Path:
        from coldfusion.encodings import encode_contribution
        from coldfusion.io.checkpoint import load_tensors, save_tensors

        self.pull_body(str(base), scratch / "base.safetensors")
        out = scratch / "payload.safetensors"
        save_tensors(out, encode_contribution(load_tensors(body), load_tensors(scratch / "base.safetensors"), encoding))
        return out

    def _body_of(self, model_dir: Path, base: int, scratch: Path) -> Path:
        from safetensors.torch import save_file

        from coldfusion.repository.uploads import read_upload

        names = set(self._get(f"/v1/versions/{base}/tensors").json()["tensors"])
        out = scratch / "body.safetensors"
        save_file({k: v.contiguous() for k, v in read_upload(model_dir, names).items()}, out)
        return out


def _unwritable(path: Path, exc: OSError) -> ColdFusionError:
    return ColdFusionError(f"{path}: could not write the download ({exc.strerror}); free some space or pull into "
                           "another directory")


def _settings(record: dict) -> dict:
    """The encoding settings (as EncodingSettings spells them) that a lineage record stands for."""
    if record["kind"] != "lora":
        return record
    return {"kind": "lora", "dtype": record["dtype"],
            "lora": {"r": record["r"], "alpha": record["alpha"], "target_modules": record["target_modules"]}}


def _chunks(f):
    while chunk := f.read(CHUNK):
        yield chunk
