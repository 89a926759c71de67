"""Gate rules: the text ``KEY OP RHS`` parsed into a :class:`Rule`, and back.

The grammar and the meaning of keys are described in :mod:`mmdiag.gate`, which evaluates rules
against reports; this module only reads and writes their text. :func:`parse_rule` raises a
:class:`~mmdiag.errors.GateError` that points at the problem and shows valid examples.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable

from mmdiag.errors import GateError

OPS = ("<=", ">=", "==", "!=", "<", ">")
ARITH = ("+", "-", "*", "/")

EXAMPLE = 'e.g. "shapley.visual >= 0.15", "verdict.severity != strong" or "reliance.audio <= baseline + 0.05"'

_OP_RE = re.compile(r"<=|>=|==|!=|=>|=<|<>|<|>|=")
_NUM_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_BASELINE_RE = re.compile(r"^baseline(?:\s*([+\-*/])\s*(\S.*))?$")
_BARE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.+\-]*$")
_KEY_RE = re.compile(r"^[^\s<>=!'\"]+$")


@dataclass(frozen=True)
class Baseline:
    """The right side ``baseline [op operand]``: the same key in the baseline report, shifted or scaled."""

    op: str | None = None
    operand: float = 0.0

    def apply(self, base: float) -> float:
        if self.op is None:
            return base
        if self.op == "+":
            return base + self.operand
        if self.op == "-":
            return base - self.operand
        if self.op == "*":
            return base * self.operand
        return base / self.operand

    def text(self) -> str:
        return "baseline" if self.op is None else f"baseline {self.op} {_fmt_num(self.operand)}"


@dataclass(frozen=True)
class Rule:
    """One parsed rule.

    Attributes:
        key: what to measure (``shapley.visual``, ``balance``, ``verdict.severity``...).
        op: one of ``< <= > >= == !=``.
        rhs: a number, a string, or a :class:`Baseline` expression.
        warn: a failing warning rule reports WARN instead of FAIL.
        text: the rule as written (for messages; not part of equality).
    """

    key: str
    op: str
    rhs: float | str | Baseline
    warn: bool = False
    text: str = field(default="", compare=False)

    @property
    def uses_baseline(self) -> bool:
        return isinstance(self.rhs, Baseline)

    def __str__(self) -> str:
        return self.text or format_rule(self)


def _fmt_num(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))

def format_rule(rule: Rule) -> str:
    """The canonical text of a rule (``parse_rule(format_rule(r)) == r``)."""
    rhs = rule.rhs
    if isinstance(rhs, Baseline):
        right = rhs.text()
    elif isinstance(rhs, str):
        bare = _BARE_RE.match(rhs) and not rhs.startswith("baseline") and not _is_number(rhs)
        right = rhs if bare else _quote(rhs)
    else:
        right = _fmt_num(rhs)
    return f"{rule.key} {rule.op} {right}"


def _quote(s: str) -> str:
    if "'" not in s:
        return f"'{s}'"
    if '"' not in s:
        return f'"{s}"'
    raise GateError(f"A string in a rule cannot hold both quote characters: {s!r}.")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _parse_number(s: str, rule_text: str, what: str) -> float:
    s = s.strip()
    if not _NUM_RE.fullmatch(s):
        raise GateError(f"In rule {rule_text!r}: {what} {s!r} is not a number. Valid rules: {EXAMPLE}.")
    value = float(s)
    if math.isinf(value) or math.isnan(value):
        raise GateError(f"In rule {rule_text!r}: {what} must be a finite number; found {s!r}.")
    return value


def parse_rule(text: str, warn: bool = False) -> Rule:
    """Parse ``KEY OP RHS``; GateError pointing at the problem (with valid examples) otherwise."""
    if not isinstance(text, str):
        raise GateError(f"A gate rule must be a string such as {EXAMPLE}; found {type(text).__name__}.")
    src = text.strip()
    if not src:
        raise GateError(f"Empty gate rule. Valid rules: {EXAMPLE}.")
    found = _OP_RE.search(src)
    if found is None:
        raise GateError(
            f"Rule {src!r} has no comparison operator (expected one of {' '.join(OPS)}). Valid rules: {EXAMPLE}."
        )
    op = found.group(0)
    if op not in OPS:
        fix = {"=": "==", "=>": ">=", "=<": "<=", "<>": "!="}[op]
        raise GateError(
            f"Rule {src!r}: operator {op!r} at position {found.start()} is not supported; did you mean {fix!r}? "
            f"Valid rules: {EXAMPLE}."
        )
    key = src[:found.start()].strip()
    right = src[found.end():].strip()
    if not key:
        raise GateError(f"Rule {src!r} has nothing left of {op!r}; expected a key such as shapley.visual. "
                        f"Valid rules: {EXAMPLE}.")
    if not _KEY_RE.match(key):
        raise GateError(
            f"Rule {src!r}: key {key!r} must be one word of dotted names without spaces or quotes "
            f"(<diagnostic>, <diagnostic>.<modality>, <diagnostic>.details.<path>, accuracy, n_samples or "
            f"verdict.<field>). Valid rules: {EXAMPLE}."
        )
    if any(not part for part in key.split(".")):
        raise GateError(f"Rule {src!r}: key {key!r} has an empty part between dots. Valid rules: {EXAMPLE}.")
    if not right:
        raise GateError(f"Rule {src!r} has nothing right of {op!r}; expected a number, a string or "
                        f"baseline [+-*/ number]. Valid rules: {EXAMPLE}.")
    if _OP_RE.search(right) and right[0] not in "'\"":
        raise GateError(f"Rule {src!r} has more than one comparison operator; write one rule per comparison. "
                        f"Valid rules: {EXAMPLE}.")
    rhs: float | str | Baseline
    base = _BASELINE_RE.match(right)
    if base is not None:
        if base.group(1) is None:
            rhs = Baseline()
        else:
            operand = _parse_number(base.group(2), src, f"the operand of {base.group(1)!r} after baseline")
            if base.group(1) == "/" and operand == 0:
                raise GateError(f"Rule {src!r} divides the baseline by zero.")
            rhs = Baseline(base.group(1), operand)
    elif right.startswith("baseline"):
        raise GateError(
            f"Rule {src!r}: cannot read {right!r}; baseline arithmetic is 'baseline', 'baseline + 0.05', "
            f"'baseline - 0.1', 'baseline * 1.1' or 'baseline / 2'."
        )
    elif right[0] in "'\"":
        if len(right) < 2 or right[-1] != right[0] or right[0] in right[1:-1]:
            raise GateError(f"Rule {src!r}: unterminated or malformed quoted string {right!r}. Valid rules: {EXAMPLE}.")
        rhs = right[1:-1]
    elif _NUM_RE.fullmatch(right):
        rhs = _parse_number(right, src, "the threshold")
    elif _BARE_RE.match(right):
        rhs = right
    else:
        raise GateError(
            f"Rule {src!r}: cannot read the right side {right!r}; expected a number (0.15), a word (strong), a "
            f"quoted string ('audio+visual') or baseline arithmetic (baseline + 0.05). Valid rules: {EXAMPLE}."
        )
    if isinstance(rhs, str) and op not in ("==", "!="):
        raise GateError(f"Rule {src!r} compares with the text {rhs!r} using {op!r}; text supports only == and !=.")
    return Rule(key=key, op=op, rhs=rhs, warn=warn, text=src)


def parse_rules(texts: Iterable[str], warn: bool = False) -> list[Rule]:
    """Parse several rules (the first malformed one raises)."""
    return [parse_rule(t, warn=warn) for t in texts]
