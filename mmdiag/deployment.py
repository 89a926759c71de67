"""The deployment distribution: how often each combination of modalities is present at test time.

The one parser of both forms; the command line, the config, the ``deployment`` diagnostic, the gate
and the missing-modality fixes read them through this module.

* **Independent missing rates**, ``rgb=0.3,depth=0.5`` (text, as ``missing`` takes it) or
  ``{"rgb": 0.3, "depth": 0.5}``: modality m is missing with probability r_m, independently of the
  others; a modality not named is never missing. The probability of the combination S (the
  modalities present) is P(S) = prod_{m in S} (1 - r_m) * prod_{m not in S} r_m.
* **A distribution over combinations**, ``{"rgb+depth": 0.6, "depth": 0.4}`` or
  ``rgb+depth=0.6,depth=0.4`` (``combinations``):
  names are modalities joined by ``+`` in any order, ``none`` is the empty combination, the
  probabilities lie in [0, 1] and sum to 1 (within 1e-6); a combination not named has probability 0.

**The empty combination** (every modality missing; with independent rates its probability is
prod_m r_m) is reported and excluded: a model cannot predict without any input, so what it would
output there says nothing about the model, and mmdiag's expected accuracy is that of the requests
the model serves, E = sum_{S non-empty} P(S) acc(S) / (1 - P(empty)). A distribution whose whole
mass is on the empty combination is refused.

Subsets are bit masks as in :mod:`mmdiag.evidence`: bit j set means ``modalities[j]`` is present.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mmdiag.errors import ConfigError
from mmdiag.registry import closest

__all__ = ["EMPTY", "SUM_TOLERANCE", "Distribution", "combination_name", "conditional", "distribution",
           "forced_present", "parse_combinations", "parse_missing"]

#: the name of the empty combination (every modality missing)
EMPTY = "none"
#: how far the probabilities of ``combinations`` may sum from 1
SUM_TOLERANCE = 1e-6

_MISSING_EXAMPLE = "e.g. `missing='rgb=0.3,depth=0.5'`"
_COMBINATIONS_EXAMPLE = "e.g. {'rgb+depth': 0.6, 'depth': 0.4}"


def _probability(value: Any, what: str, example: str) -> float:
    """A number in [0, 1] from a float, an int or (from text) its digits; ConfigError otherwise."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{what} must be a number between 0 and 1; found {value!r} ({example}).") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{what} must be a number between 0 and 1; found {value!r} ({example}).")
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{what} must be between 0 and 1; found {value} ({example}).")
    return float(value)


def _pairs(spec: Any, what: str, example: str) -> list[tuple[str, Any]]:
    """(name, value) pairs from ``a=0.1,b=0.2`` text, a list of such texts, or a mapping."""
    if isinstance(spec, Mapping):
        return [(str(k).strip(), v) for k, v in spec.items()]
    texts = [spec] if isinstance(spec, str) else spec
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"`{what}` must be NAME=VALUE text or a table; found {spec!r} ({example}).")
    out = []
    for item in (part.strip() for text in texts for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"`{what}` expects NAME=VALUE entries separated by commas; the part {item!r} has "
                              f"no '=' ({example}).")
        out.append((name.strip(), value.strip()))
    return out


def parse_missing(spec: Any) -> dict[str, float]:
    """Independent missing rates: modality -> probability that it is missing, each in [0, 1].

    ``spec`` is ``"rgb=0.3,depth=0.5"``, a list of such texts, or a mapping. ConfigError for an
    empty spec, a modality named twice, or a rate that is not a number in [0, 1]. The names are
    checked against the model's modalities later (:meth:`Distribution.probabilities`).
    """
    pairs = _pairs(spec, "missing", _MISSING_EXAMPLE)
    if not pairs:
        raise ConfigError(f"`missing` names no modality ({_MISSING_EXAMPLE}).")
    rates: dict[str, float] = {}
    for name, value in pairs:
        if name in rates:
            raise ConfigError(f"`missing` names modality {name!r} twice; give each modality one rate.")
        rates[name] = _probability(value, f"The missing rate of {name!r}", _MISSING_EXAMPLE)
    return rates


def _members(name: str) -> frozenset[str]:
    if name.strip().lower() == EMPTY:
        return frozenset()
    parts = [p.strip() for p in name.split("+")]
    if any(not p for p in parts):
        raise ConfigError(f"Combination {name!r} has an empty part; write modalities joined by '+' "
                          f"({_COMBINATIONS_EXAMPLE}), or {EMPTY!r} for the empty combination.")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"Combination {name!r} names a modality twice; name each once.")
    return frozenset(parts)


def parse_combinations(spec: Any) -> dict[str, float]:
    """A distribution over combinations: canonical name -> probability.

    ``spec`` maps ``"rgb+depth"``-style names (any order; ``none`` = the empty combination) to
    probabilities in [0, 1] that sum to 1 within :data:`SUM_TOLERANCE`, as a mapping or as text
    ``rgb+depth=0.6,depth=0.4``. The canonical name sorts the members (the model's modality order
    is applied later). ConfigError for a combination named twice (``rgb+depth`` and
    ``depth+rgb``), a bad probability or a sum other than 1.
    """
    out: dict[str, float] = {}
    seen: dict[frozenset[str], str] = {}
    for raw, value in _pairs(spec, "combinations", _COMBINATIONS_EXAMPLE):
        members = _members(str(raw))
        if members in seen:
            raise ConfigError(f"`combinations` lists the same combination twice: {seen[members]!r} and {raw!r}.")
        seen[members] = str(raw)
        out["+".join(sorted(members)) or EMPTY] = _probability(
            value, f"The probability of combination {raw!r}", _COMBINATIONS_EXAMPLE)
    if not out:
        raise ConfigError(f"`combinations` is empty ({_COMBINATIONS_EXAMPLE}).")
    total = sum(out.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ConfigError(f"The probabilities of `combinations` must sum to 1 (within {SUM_TOLERANCE:g}); "
                          f"they sum to {total:.6g}. Scale them, or add the missing combinations.")
    return out


def combination_name(mask: int, modalities: Sequence[str]) -> str:
    """``audio+visual`` for a bit mask (modalities in model order), ``none`` for the empty one."""
    return "+".join(m for j, m in enumerate(modalities) if mask >> j & 1) or EMPTY


@dataclass(frozen=True)
class Distribution:
    """A deployment distribution in one of its forms (see the module doc).

    Attributes:
        source: ``missing`` (independent rates), ``combinations`` (explicit) or ``uniform`` (none was
            given: every non-empty combination equally likely).
        missing: modality -> missing rate (``source == "missing"``).
        combinations: canonical combination name -> probability (``source == "combinations"``).
    """

    source: str
    missing: Mapping[str, float] | None = None
    combinations: Mapping[str, float] | None = None

    def params(self) -> dict[str, Any]:
        """The distribution as parameters of the ``deployment`` diagnostic (``{}`` for uniform)."""
        if self.source == "missing":
            return {"missing": dict(self.missing or {})}
        if self.source == "combinations":
            return {"combinations": dict(self.combinations or {})}
        return {}

    def describe(self) -> str:
        """One line: the form and its numbers."""
        if self.source == "missing":
            return "independent missing rates " + ", ".join(f"{m}={r:g}" for m, r in (self.missing or {}).items())
        if self.source == "combinations":
            return "combinations " + ", ".join(f"{c}={p:g}" for c, p in (self.combinations or {}).items())
        return "the uniform distribution over the non-empty combinations (no `missing` or `combinations` given)"

    def probabilities(self, modalities: Sequence[str]) -> np.ndarray:
        """[2^M] probability of each subset mask, the empty one (mask 0) included.

        ConfigError when a name is not one of ``modalities``, or when the whole mass is on the
        empty combination.
        """
        mods = list(modalities)
        n = 1 << len(mods)
        if self.source == "missing":
            rates = dict(self.missing or {})
            _check_names(rates, mods, "missing", "modality")
            p = np.ones(n)
            for j, m in enumerate(mods):
                present = (np.arange(n) >> j) & 1
                p *= np.where(present == 1, 1.0 - rates.get(m, 0.0), rates.get(m, 0.0))
        elif self.source == "combinations":
            p = np.zeros(n)
            for name, prob in (self.combinations or {}).items():
                members = _members(name)
                _check_names(dict.fromkeys(members), mods, "combinations", f"combination {name!r} names modality")
                p[sum(1 << mods.index(m) for m in members)] = prob
        else:
            p = np.full(n, 1.0 / (n - 1))
            p[0] = 0.0
        if p[0] >= 1.0 - 1e-12:
            raise ConfigError(f"Under {self.describe()} every modality is always missing (the empty combination "
                              "has probability 1): there is nothing the model could be evaluated on. Give at "
                              "least one modality a rate below 1 (or a combination with a modality present a "
                              "positive probability).")
        return p


def _check_names(names: Mapping[str, Any], modalities: list[str], setting: str, what: str) -> None:
    for name in names:
        if name not in modalities:
            near = closest(name, modalities)
            raise ConfigError(
                f"`{setting}`: {what} {name!r}, which is not a modality of this model; its modalities are "
                f"{', '.join(modalities)}." + (f" Did you mean {near!r}?" if near else ""))


def distribution(missing: Any = None, combinations: Any = None) -> Distribution:
    """The :class:`Distribution` of ``missing`` or ``combinations`` (parsed here), uniform when neither.

    ConfigError when both are given (one deployment distribution at a time) or either does not parse.
    """
    if missing is not None and combinations is not None:
        raise ConfigError("Give the deployment distribution once: `missing` (independent rates) or "
                          "`combinations` (a distribution over combinations), not both.")
    if missing is not None:
        return Distribution("missing", missing=parse_missing(missing))
    if combinations is not None:
        return Distribution("combinations", combinations=parse_combinations(combinations))
    return Distribution("uniform")


def conditional(p: np.ndarray) -> tuple[np.ndarray, float]:
    """(Q, P(empty)): the distribution over the non-empty masks, renormalised (Q[0] = 0)."""
    p = np.asarray(p, dtype=np.float64)
    empty = float(p[0])
    q = p.copy()
    q[0] = 0.0
    return q / q.sum(), empty


def forced_present(p: np.ndarray, j: int) -> np.ndarray:
    """The distribution of the combination when modality ``j`` is never missing: the mass of every
    subset S moves to S with bit j set (the empty combination becomes j alone)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    np.add.at(out, np.arange(p.shape[0]) | (1 << j), p)
    return out
