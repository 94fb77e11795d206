"""The repository: versions of the base and the contributions that made them.

- `store`: content-addressed bodies plus the lineage index (`Repository`), kept where
  `io/storage` says (SQLite + a directory, or PostgreSQL + S3);
- `schema`: the index's tables and the lineage rules it enforces;
- `fusion_pipeline`: validate, decode, rebase and fuse waiting contributions;
- `validation`: the checks a contribution must pass before it is fused;
- `integrity`: `verify`;
- `uploads`: contributions sent from outside a run; `export`: a version as a model directory.
"""

from coldfusion.infra.lazy import lazy_exports

_LAZY = {name: "coldfusion.repository.store" for name in ("Computed", "Contribution", "Repository", "StoredModel",
                                                          "Version")}
_LAZY["IntegrityReport"] = "coldfusion.repository.integrity"

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
