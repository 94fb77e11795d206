"""The repository: versions of the base and the contributions that made them.

- `store`: content-addressed bodies plus the lineage index (`Repository`), kept where
  `io/storage` says (SQLite + a directory, or PostgreSQL + S3);
- `schema`: the index's tables and the lineage rules it enforces;
- `intake`: admission, the one way a contribution enters (its rules in `validation`);
- `refs`: version references (`latest`, ids, checksum prefixes), parsed in one place;
- `fusion_pipeline`: select, decode, rebase and fuse waiting contributions (`fuse_step`);
- `validation`: the operator's rules and the inspection of a body against its base;
- `integrity`: `verify`;
- `uploads`: contributions sent from outside a run; `export`: a version as a model directory.
"""

from coldfusion.infra.lazy import lazy_exports

_LAZY = {name: "coldfusion.repository.store" for name in ("Computed", "Contribution", "Repository", "StoredModel",
                                                          "Version")}
_LAZY["IntegrityReport"] = "coldfusion.repository.integrity"

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
