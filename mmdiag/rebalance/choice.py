"""Which fix :func:`~mmdiag.rebalance.rebalance` trains: ``auto``'s choice from a report's verdict, and
a fix made from its name and parameters given as text (``--fix-param alpha=0.8``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, Fix
from mmdiag.registry import closest
from mmdiag.report import Report

__all__ = ["DEPLOYMENT_PARAMS", "FALLBACK_FIX", "choose_fix", "deployment_training_note", "make_fix",
           "parse_param_value"]

#: The fix used when ``auto`` finds no usable recommendation.
FALLBACK_FIX = "ogm_ge"

#: The parameters through which a missing-modality fix draws its training combinations (default: the
#: uniform mix over the non-empty combinations, whatever the deployment distribution).
DEPLOYMENT_PARAMS = ("missing", "combinations")


def parse_param_value(text: Any) -> Any:
    """A ``--fix-param`` value from text: none/null, true/false, int, float, else the string."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    low = t.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _fix_params_for(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Scalar entries apply to whichever fix is used; a table named like a fix only to that fix."""
    out: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        if isinstance(value, Mapping):
            if key not in FIXES:
                FIXES.get(key)  # ConfigError naming the closest fix
            if key == name:
                out.update(value)
        elif "." in key:
            fix_name, _, sub = key.partition(".")
            if fix_name not in FIXES:
                FIXES.get(fix_name)
            if fix_name == name:
                out[sub] = value
        else:
            out[key] = value
    return out


def make_fix(name: str, params: Mapping[str, Any] | None = None) -> Fix:
    """Instantiate the fix ``name`` with ``params`` (values given as text are parsed); unknown
    names and parameters are a ConfigError naming the closest ones."""
    cls = FIXES.get(name)
    known = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    kwargs = {}
    for key, value in _fix_params_for(name, params).items():
        if key not in known:
            near = closest(key, known)
            raise ConfigError(
                f"Fix {name!r} has no parameter {key!r}."
                + (f" Did you mean {near!r}?" if near else "")
                + f" Its parameters are: {', '.join(known) or '(none)'}."
            )
        value = parse_param_value(value)
        default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Bad parameters for fix {name!r}: {exc}") from None


def deployment_training_note(name: str, params: Mapping[str, Any] | None,
                             deployment: Mapping[str, Any] | None) -> str | None:
    """A note when the fix ``name`` takes :data:`DEPLOYMENT_PARAMS`, a deployment distribution (the
    ``deployment`` diagnostic's ``missing`` or ``combinations``) is given, and ``params`` sets neither
    parameter for the fix: it trains on its uniform default, and its own parameter would train it on
    the deployment distribution. Else None. The distribution never changes the fix's parameters: on
    AV-digits the uniform mix kept full-input accuracy that the deployment distribution cost
    (docs/deployment.md)."""
    from mmdiag.deployment import distribution

    dist = {k: v for k, v in dict(deployment or {}).items() if k in DEPLOYMENT_PARAMS and v is not None}
    takes = {f.name for f in dataclasses.fields(FIXES.get(name)) if f.init}
    given = _fix_params_for(name, params)
    if not dist or not takes.issuperset(DEPLOYMENT_PARAMS) or any(k in given for k in DEPLOYMENT_PARAMS):
        return None
    key = next(iter(dist))
    spec = distribution(**{key: dist[key]})
    value = ",".join(f"{k}={p:g}" for k, p in (getattr(spec, key) or {}).items())
    return (f"{name} trains on the uniform mix over the non-empty combinations, not on the deployment "
            f"distribution of `{key}` ({spec.describe()}); `fix_params` {key}={value} trains it on that "
            f"distribution instead (see docs/deployment.md)")


def choose_fix(report: Report | None) -> dict[str, Any]:
    """The ``auto`` choice from a report's verdict: ``{"used", "recommended", "reasons", "note"}``."""
    recommended = report.verdict.recommended_fix if report is not None else None
    reasons = list(report.verdict.reasons) if report is not None else []
    if recommended is None:
        note = (f"the verdict recommends no fix ({report.verdict.headline()}); using the default {FALLBACK_FIX}"
                if report is not None else f"no analysis to recommend a fix; using the default {FALLBACK_FIX}")
        return {"used": FALLBACK_FIX, "recommended": None, "reasons": reasons, "note": note}
    if recommended not in FIXES:
        note = (f"the verdict recommends {recommended!r}, which is not a registered fix in this installation "
                f"(registered: {', '.join(FIXES.names())}); falling back to {FALLBACK_FIX}")
        return {"used": FALLBACK_FIX, "recommended": recommended, "reasons": reasons, "note": note}
    return {"used": recommended, "recommended": recommended, "reasons": reasons,
            "note": f"the verdict recommends {recommended}"}
