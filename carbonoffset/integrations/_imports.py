"""Optional framework imports, deferred: an integration module always imports, and building its
callback without the framework raises :class:`ModuleNotFoundError` naming the package and the
extra to install, with the original import error kept as its ``__cause__``.

Every integration uses it the same way::

    _KERAS = OptionalImport("Keras", "keras>=3", extra="keras")
    with _KERAS:
        import keras

    class CarbonOffsetCallback(...):
        def __init__(self, ...):
            _KERAS.check("CarbonOffsetCallback")  # raises here, not at import
"""

from __future__ import annotations

import re
from types import TracebackType


class OptionalImport:
    """A context manager around the imports of one optional framework that keeps their failure.

    An :class:`ImportError` raised inside the ``with`` block is caught and kept (the block's
    remaining statements are skipped); :meth:`check` raises it later, as a
    :class:`ModuleNotFoundError` whose ``__cause__`` is the original error.

    Args:
        framework: the framework's name in the message (``"Hugging Face Transformers"``).
        requirement: the pip requirement the callback needs (``"transformers>=4.45"``); its
            project name, with ``-`` read as ``_``, is the top-level module whose absence means
            "not installed".
        extra: the carbonoffset extra that installs it (``pip install carbonoffset[<extra>]``).
        broken_hint: when given, an import that fails although the package is installed (one of
            its own imports fails, e.g. Keras without its backend) is reported as "could not
            import <package> (<error>). <broken_hint>" instead of "requires <requirement>".
    """

    def __init__(
        self, framework: str, requirement: str, *, extra: str, broken_hint: str | None = None
    ) -> None:
        self.framework = framework
        self.requirement = requirement
        self.extra = extra
        self.broken_hint = broken_hint
        self.package = re.split(r"[^A-Za-z0-9_.-]", requirement, maxsplit=1)[0].replace("-", "_")
        #: the import error caught in the ``with`` block; ``None`` while every import succeeded
        self.error: ImportError | None = None

    def __enter__(self) -> OptionalImport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if isinstance(exc, ImportError):
            self.error = exc
            return True  # kept for check(); the module goes on importing
        return False

    @property
    def available(self) -> bool:
        """Every import in the ``with`` block succeeded."""
        return self.error is None

    def missing(self, callback: str) -> ModuleNotFoundError:
        """The error for building ``callback`` without the framework, its cause set to the import error."""
        error = self.error
        absent = isinstance(error, ModuleNotFoundError) and error.name == self.package
        if error is not None and self.broken_hint is not None and not absent:
            found = ModuleNotFoundError(
                f"`{callback}` for {self.framework} could not import {self.package} "
                f"({type(error).__name__}: {error}). {self.broken_hint}"
            )
        else:  # "`CarbonOffsetCallback` for Keras requires `keras>=3`; install it with `pip install ...`"
            found = ModuleNotFoundError(
                f"`{callback}` for {self.framework} requires `{self.requirement}`; install it with "
                f"`pip install carbonoffset[{self.extra}]`"
            )
        found.__cause__ = error
        return found

    def check(self, callback: str) -> None:
        """Raise :meth:`missing` for ``callback`` when an import failed; else nothing.

        Raises:
            ModuleNotFoundError: the framework is not installed (or not importable).
        """
        if self.error is not None:
            raise self.missing(callback)
