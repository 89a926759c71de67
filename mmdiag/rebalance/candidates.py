"""Which fixes a leaderboard or a race trains, and each one's parameters.

``fix="ogm_ge,arl,mmpareto"`` names the candidates; ``fix="all"`` means every registered fix (read
from the registry, plug-ins included) except ``none``, which is the plain baseline every leaderboard
trains anyway. Parameters (``fix_params``) are the ones of a single-fix run, with stricter rules
because several fixes share them:

* ``ogm_ge.alpha = 0.8`` (or a table ``ogm_ge = {alpha = 0.8}``) applies to ``ogm_ge`` only; a prefix
  naming a fix that is not among the candidates is an error (it would silently do nothing);
* an unprefixed ``alpha = 0.8`` applies to every candidate, so it must be a parameter of every
  candidate (with one candidate this is the single-fix rule).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.registry import closest

__all__ = ["ALL", "BASELINE", "candidate_params", "is_fix_list", "parse_fix_list"]

#: The name of "every registered fix" in a fix list.
ALL = "all"
#: The plain training every leaderboard compares against (the registry's no-op fix).
BASELINE = "none"


def is_fix_list(fix: str) -> bool:
    """Whether ``fix`` asks for a leaderboard: ``all`` or a comma-separated list of fixes."""
    return fix.strip() == ALL or "," in fix


def _check_name(name: str, known: Sequence[str]) -> None:
    if name not in known:
        near = closest(name, list(known))
        raise ConfigError(
            f"Unknown fix {name!r} in the fix list. Known fixes: {', '.join(known)} (or {ALL!r} for every one)."
            + (f" Did you mean {near!r}?" if near else "")
        )


def parse_fix_list(fix: str | Sequence[str], with_baseline: bool = False) -> list[str]:
    """The candidate fixes of ``fix`` (``all``, ``a,b,c`` or a sequence of names), in the given order,
    without duplicates. ``none`` is left out (a leaderboard always trains the baseline) unless
    ``with_baseline``: then ``all`` starts with it and a list keeps it where it is named.

    Raises:
        ConfigError: an unknown name (naming the closest registered one), or no candidate left.
    """
    known = [n for n in FIXES.names() if n != BASELINE]
    names = [s.strip() for s in fix.split(",")] if isinstance(fix, str) else [str(s).strip() for s in fix]
    names = [n for n in names if n]
    if names == [ALL]:
        return [BASELINE, *known] if with_baseline else known
    for name in names:
        if name != BASELINE:
            _check_name(name, known)
    chosen = list(dict.fromkeys(n for n in names if n != BASELINE or with_baseline))
    if not chosen:
        raise ConfigError(f"The fix list {fix!r} names no fix besides the baseline {BASELINE!r}; name at least "
                          f"one fix (see `mmdiag list fixes`) or {ALL!r}.")
    return chosen


def _parameters(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(FIXES.get(name)) if f.init and not f.name.startswith("_")]


def candidate_params(candidates: Sequence[str], params: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each candidate's own parameters from ``params`` (see the module doc for the rules).

    Raises:
        ConfigError: a prefix naming a fix outside ``candidates``, or an unprefixed parameter that
        some candidate does not have.
    """
    own: dict[str, dict[str, Any]] = {c: {} for c in candidates}
    shared: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        if isinstance(value, Mapping) or "." in key:
            fix_name, _, sub = (key, "", "") if isinstance(value, Mapping) else key.partition(".")
            if fix_name not in own:
                hint = closest(fix_name, list(candidates))
                raise ConfigError(
                    f"Fix parameter {key!r} is for {fix_name!r}, which is not among the fixes trained "
                    f"({', '.join(candidates)}); it would change nothing. Add {fix_name!r} to the fix list or "
                    "drop the parameter." + (f" Did you mean {hint!r}?" if hint else "")
                )
            own[fix_name].update(dict(value) if isinstance(value, Mapping) else {sub: value})
        else:
            shared[key] = value
    for key, value in shared.items():
        lacking = [c for c in candidates if key not in _parameters(c)]
        if lacking and len(candidates) > 1:
            raise ConfigError(
                f"Fix parameter {key!r} has no fix prefix, so it would apply to every fix trained, but "
                f"{', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no parameter {key!r}. "
                f"Give it a fix prefix to set it for one fix only (e.g. {candidates[0]}.{key}={value})."
            )
        for c in candidates:
            own[c].setdefault(key, value)
    return own
