"""Package attributes loaded on first access (PEP 562), for ``carbonoffset`` and ``carbonoffset.core``:
importing a package (or one of its submodules) imports none of the modules its names come from."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_attributes(
    package: str, sources: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``(__getattr__, __dir__)`` of ``package``: a name of ``sources`` is imported from its module
    (``sources[name]``) on first access and then kept in the package.

    Raises (from ``__getattr__``):
        AttributeError: for a name not in ``sources``, as for any missing module attribute.
    """

    def getattr_(name: str) -> object:
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return getattr_, dir_
