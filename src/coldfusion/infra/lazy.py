"""Package attributes imported on first use (PEP 562), so that importing a package's light
parts (the settings a config reads) never pays for torch or transformers."""

import importlib


def lazy_exports(package: str, where: dict[str, str]):
    """A module `__getattr__` that imports `name` from module `where[name]` when first asked."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
