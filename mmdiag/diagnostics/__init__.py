"""Diagnostics: one module each, registered in :data:`DIAGNOSTICS` on import.

Every module of this package (except private ones starting with ``_``) is imported here, so a new
diagnostic needs no other edit to appear in ``mmdiag list``, the conformance tests and the docs.
"""

from __future__ import annotations

import importlib
import pkgutil

from mmdiag.diagnostics.base import DIAGNOSTICS, Diagnostic, register_diagnostic

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["DIAGNOSTICS", "Diagnostic", "register_diagnostic"]
