"""`coldfusion export`: a repository version as a Hugging Face model directory.

Besides what `AutoModel.from_pretrained` loads, the directory carries a model card
(README.md) and `coldfusion_provenance.json`: the base model by its portable name, the
version and its lineage down to the pretrained root, the checksums of the stored body
and of every file written, and the coldfusion version that wrote it.
"""

import json
from datetime import UTC, datetime
from pathlib import Path

import yaml

from coldfusion import __version__
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import staged_directory
from coldfusion.io.model_files import sha256_file
from coldfusion.models.encoder import Encoder
from coldfusion.models.names import card_name
from coldfusion.repository import Repository, Version

PROVENANCE_FILE = "coldfusion_provenance.json"


def export_version(repo: Repository, ref: int | str, out_dir: Path, overwrite: bool = False) -> tuple[Version, Path]:
    """Write version `ref` (an id, a checksum prefix or 'latest') to `out_dir`, atomically."""
    version = repo.resolve(ref)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ColdFusionError(f"{out_dir} exists and is not empty; choose another directory or pass --overwrite")
    encoder = Encoder.from_repository(repo, version)
    with staged_directory(out_dir) as tmp:
        encoder.save_pretrained(encoder.pretrained, tmp)
        record = provenance(repo, version, encoder.name)
        record["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record))
    return version, out_dir


def provenance(repo: Repository, version: Version, model_name: str) -> dict:
    lineage = []
    for v in repo.lineage(version.id):
        fusion = v.fusion or {}
        contributions = [{"id": c.id, "contributor": c.contributor, "task": c.task, "num_examples": c.num_examples,
                          "sha256": c.sha256} for c in repo.contributions(fused_into=v.id)]
        lineage.append({"version": v.id, "sha256": v.sha256, "parent": v.parent, "run": v.run,
                        "iteration": v.iteration, "method": fusion.get("method"), "params": fusion.get("params"),
                        "contributions": contributions, "created": v.created})
    return {"coldfusion_version": __version__, "exported": datetime.now(UTC).isoformat(timespec="seconds"),
            "base_model": card_name(model_name),
            "coldfusion_model": model_name, "version": version.id, "body_sha256": version.sha256,
            "status": version.status, "status_reason": version.held_back or version.abandoned, "lineage": lineage}


def model_card(record: dict) -> str:
    front = {"base_model": record["base_model"], "library_name": "transformers",
             "tags": ["coldfusion", "feature-extraction", "model-merging"]}
    rows = "\n".join(f"| {v['version']} | {v['iteration'] if v['iteration'] is not None else '-'} | "
                     f"{v['method'] or 'pretrained'} | {len(v['contributions'])} | `{v['sha256'][:16]}` |"
                     for v in record["lineage"])
    files = "\n".join(f"| `{name}` | `{sha}` |" for name, sha in record["files"].items())
    warning = (f"> **Not a published version: {record['status'].replace('_', ' ')}.** {record['status_reason']}\n\n"
               if record["status"] != "live" else "")
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# ColD Fusion encoder, version {record['version']}\n\n{warning}"
            f"A text encoder improved collaboratively with [coldfusion](https://pypi.org/project/coldfusion/) "
            f"{record['coldfusion_version']}: contributors finetuned the base on their own data, and the repository "
            f"fused their bodies into each next version. Base model: `{record['base_model']}`. "
            f"Stored body sha256: `{record['body_sha256']}`.\n\n"
            f"## Lineage (newest first)\n\n| version | iteration | fusion | contributions | sha256 |\n"
            f"|---|---|---|---|---|\n{rows}\n\n"
            f"## Files\n\n| file | sha256 |\n|---|---|\n{files}\n\n"
            f"Every contribution, with its contributor, task and checksum: `{PROVENANCE_FILE}`.\n")
