"""Fixes: one module each, registered in :data:`FIXES` on import (see :mod:`mmdiag.fixes.base`)."""

from __future__ import annotations

import importlib
import pkgutil

from mmdiag.fixes.base import FIXES, Fix, FixContext, Step, fix_step, register_fix

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FIXES", "Fix", "FixContext", "Step", "fix_step", "register_fix"]
