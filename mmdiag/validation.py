"""Settings checked by type and range: one declarative schema for flags, config files and the library.

A :class:`Spec` says what one setting must be: an integer >= 0, a number in (0, 1], true or false,
one of a few words, and so on. :data:`SETTINGS` covers every setting of ``mmdiag analyze`` and
``mmdiag rebalance`` (the flag and the config key are the same setting), :data:`COLLECT` the fields
of :class:`~mmdiag.collect.CollectSettings` (the ``[collect]`` table), :data:`THRESHOLDS` the
verdict thresholds (the ``[thresholds]`` table). The CLI checks flags and config values against
them; the library checks its own arguments against the same entries, so a wrong value is a
:class:`~mmdiag.errors.ConfigError` that names the setting, the expected type or range and what was
found, wherever it comes from.

Values are checked strictly: ``"yes"`` is not a boolean, ``1.5`` is not an integer and ``"1e-3"``
(a quoted string) is not a number.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mmdiag.errors import ConfigError

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Spec:
    """What one setting must be.

    Attributes:
        kind: ``int``, ``float``, ``bool``, ``str``, ``path``, ``choice``, ``device``, ``names``
            (a comma-separated string or a list of strings), ``strings`` (a string or a list of strings, kept
            as a list), ``pairs`` (KEY=VALUE strings, a list of
            them or a table) or ``ints`` (a non-empty list of integers).
        minimum, maximum: the range of ``int``, ``float`` and ``ints`` values.
        above: the minimum itself is excluded (``> minimum`` rather than ``>= minimum``).
        choices: the allowed words of a ``choice``.
        optional: ``None`` (not set) is allowed.
        hint: a few words added to the message (what the value means).
    """

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    hint: str = ""

    def expected(self) -> str:
        """What the setting must be, in words (``an integer >= 0``)."""
        what = {
            "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "path": "a path", "device": "auto, cpu, mps, cuda or cuda:N",
            "choice": "one of " + ", ".join(self.choices),
            "names": "a comma-separated string or a list of strings",
            "pairs": "KEY=VALUE strings (a string, a list of them, or a table)",
            "strings": "a string or a list of strings",
            "ints": "a non-empty list of integers",
        }[self.kind]
        if self.kind in ("int", "float", "ints"):
            what += _range_text(self.minimum, self.maximum, self.above)
        return what + (f" ({self.hint})" if self.hint else "")

    def check(self, value: Any, name: str) -> Any:
        """``value`` when it fits (lists of names joined by commas, pairs as a list); ConfigError otherwise."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{name} must be {self.expected()}; found nothing (None).")
        ok, out = _CHECKS[self.kind](self, value)
        if not ok:
            raise ConfigError(f"{name} must be {self.expected()}; found {describe(value)}.{_advice(self, value)}")
        return out


def _range_text(lo: float | None, hi: float | None, above: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if above else '['}{_num(lo)}, {_num(hi)}]"
    if lo is not None:
        return f" {'>' if above else '>='} {_num(lo)}"
    if hi is not None:
        return f" <= {_num(hi)}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def describe(value: Any) -> str:
    """A found value for a message: ``'lots' (a string)``, ``1.5``, ``true (a boolean)``."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, (numbers.Number, list, tuple, dict)):
        return repr(value)
    return f"{value!r} (a {type(value).__name__})"


def _advice(spec: Spec, value: Any) -> str:
    if isinstance(value, str) and spec.kind in ("int", "float", "ints"):
        try:
            float(value)
        except ValueError:
            return ""
        return " Write the number without quotes."
    if isinstance(value, str) and spec.kind == "bool" and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return " Write true or false without quotes."
    if spec.kind == "choice" and isinstance(value, str):
        from mmdiag.registry import closest

        near = closest(value, list(spec.choices))
        return f" Did you mean {near!r}?" if near else ""
    return ""


def _in_range(spec: Spec, x: float) -> bool:
    if spec.minimum is not None and (x <= spec.minimum if spec.above else x < spec.minimum):
        return False
    return spec.maximum is None or x <= spec.maximum


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(spec: Spec, value: Any) -> tuple[bool, Any]:
    return (_is_int(value) and _in_range(spec, int(value))), (int(value) if _is_int(value) else value)


def _float(spec: Spec, value: Any) -> tuple[bool, Any]:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        return False, value
    return _in_range(spec, float(value)), value


def _bool(spec: Spec, value: Any) -> tuple[bool, Any]:
    return isinstance(value, bool), value


def _str(spec: Spec, value: Any) -> tuple[bool, Any]:
    return isinstance(value, str) and bool(value.strip()), value


def _path(spec: Spec, value: Any) -> tuple[bool, Any]:
    return (isinstance(value, os.PathLike) or (isinstance(value, str) and bool(value.strip()))), value


def _choice(spec: Spec, value: Any) -> tuple[bool, Any]:
    return isinstance(value, str) and value in spec.choices, value


def _device(spec: Spec, value: Any) -> tuple[bool, Any]:
    text = str(value) if type(value).__name__ == "device" else value  # a torch.device from the library
    return isinstance(text, str) and bool(_DEVICE_RE.match(text.strip())), value


def _names(spec: Spec, value: Any) -> tuple[bool, Any]:
    if isinstance(value, str):
        return True, value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return True, ",".join(value)
    return False, value


def _pairs(spec: Spec, value: Any) -> tuple[bool, Any]:
    if isinstance(value, str):
        return True, [value]
    if isinstance(value, Mapping) and all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        return True, [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return True, list(value)
    return False, value


def _strings(spec: Spec, value: Any) -> tuple[bool, Any]:
    if isinstance(value, str):
        return True, [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return True, list(value)
    return False, value


def _ints(spec: Spec, value: Any) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)) or not value:
        return False, value
    return all(_is_int(v) and _in_range(spec, int(v)) for v in value), tuple(int(v) if _is_int(v) else v for v in value)


_CHECKS: dict[str, Callable[[Spec, Any], tuple[bool, Any]]] = {
    "int": _int, "float": _float, "bool": _bool, "str": _str, "path": _path, "choice": _choice,
    "device": _device, "names": _names, "pairs": _pairs, "strings": _strings, "ints": _ints,
}

BOOL = Spec("bool")
COUNT = Spec("int", minimum=0)
POSITIVE_INT = Spec("int", minimum=1)
FRACTION = Spec("float", minimum=0.0, maximum=1.0, above=True)
UNIT = Spec("float", minimum=0.0, maximum=1.0)
DEVICE = Spec("device")
SEED = Spec("int", minimum=0)
BOOTSTRAP = Spec("int", minimum=0, hint="0 computes no intervals")
TEXT = Spec("str", optional=True)
PATH = Spec("path", optional=True)
NAMES = Spec("names", optional=True)

#: Every setting of ``analyze`` and ``rebalance``: the flag ``--batch-size`` and the config key
#: ``batch_size`` (or ``batch-size``) are one entry. ``baseline`` differs by command (see
#: :data:`REBALANCE`). The choices are those of the modules that use them (checked by a test).
SETTINGS: dict[str, Spec] = {
    "model": TEXT, "checkpoint": PATH, "data": TEXT, "val_data": TEXT, "probe_data": TEXT,
    "modalities": NAMES, "only": NAMES, "skip": NAMES, "format": NAMES,
    "call": Spec("choice", choices=("dict", "kwargs", "positional"), optional=True),
    "encoder": Spec("pairs", optional=True), "head": TEXT,
    "mask": Spec("choice", choices=("zero", "mean", "noise")),
    "mask_at": Spec("choice", choices=("input", "feature"), optional=True),
    "checkpoint_key": TEXT, "strip_prefix": TEXT,
    "trust_checkpoint": BOOL, "per_sample": BOOL, "overwrite": BOOL, "save_evidence": BOOL,
    "run_gate": BOOL, "baseline": PATH,
    "batch_size": POSITIVE_INT, "num_workers": COUNT, "device": DEVICE, "seed": SEED, "bootstrap": BOOTSTRAP,
    "max_subsets": POSITIVE_INT, "max_probe_samples": COUNT, "out": PATH,
    "nan_policy": Spec("choice", choices=("error", "skip")),
    # the choices are the registry's shareable contribution measures (plug-ins included): the CLI
    # fills them in (mmdiag.cli.config.registry_choices) and balance checks its own argument
    "balance_of": Spec("choice", optional=True),
    "num_classes": Spec("int", minimum=1, optional=True),
    "fix": Spec("str"), "fix_param": Spec("pairs", optional=True),
    "epochs": POSITIVE_INT, "optimizer": Spec("choice", choices=("sgd", "adam", "adamw")),
    "lr": Spec("float", minimum=0.0, above=True), "weight_decay": Spec("float", minimum=0.0),
    "momentum": Spec("float", minimum=0.0), "init": Spec("choice", choices=("scratch", "checkpoint")),
    "grad_clip": Spec("float", minimum=0.0, above=True, optional=True),
    # leaderboard and race (the objectives are those of mmdiag.rebalance.scoring.OBJECTIVES)
    "objective": Spec("choice", choices=("fused", "weakest", "balance", "deployment")), "jobs": POSITIVE_INT,
    "race": BOOL, "candidates": NAMES, "holdout": Spec("float", minimum=0.0, maximum=1.0, above=True),
    "pool": Spec("choice", choices=("mean", "first", "flatten")),
    # the deployment distribution (independent missing rates, parsed by mmdiag.deployment) and new
    # data scored for distribution shift
    "missing": Spec("pairs", optional=True, hint="MODALITY=RATE, e.g. rgb=0.3,depth=0.5"),
    "ood_data": TEXT, "restore": PATH, "ood_quantile": Spec("float", minimum=0.0, maximum=1.0, above=True, optional=True),
    # experiment trackers (mmdiag.integrations.trackers.parse_target reads each)
    "log_to": Spec("strings", optional=True, hint="TRACKER[:WHERE], e.g. tensorboard:runs or mlflow"),
}
#: ``rebalance --baseline`` is a switch (also train the plain model); ``analyze --baseline`` a report path.
REBALANCE: dict[str, Spec] = {**SETTINGS, "baseline": BOOL}

#: The fields of :class:`~mmdiag.collect.CollectSettings` (the ``[collect]`` table and its flags).
COLLECT: dict[str, Spec] = {
    "batch_size": POSITIVE_INT, "num_workers": COUNT, "device": DEVICE, "seed": SEED,
    "max_feature_samples": COUNT, "max_grad_samples": COUNT, "grad_fraction": FRACTION,
    "param_grad_fraction": FRACTION, "param_grad_rows": POSITIVE_INT, "noise_fraction": FRACTION, "max_noise_samples": COUNT, "max_attribution_samples": COUNT,
    "attribution_fraction": FRACTION, "stats_samples": COUNT, "permutations": POSITIVE_INT,
    "noise_levels": Spec("ints", minimum=1, hint="1 is clean"), "noise_step": Spec("float", minimum=0.0, above=True),
    "ig_steps": POSITIVE_INT, "ig_max_steps": POSITIVE_INT, "ig_tolerance": Spec("float", minimum=0.0),
    "max_subsets": POSITIVE_INT, "pool": Spec("choice", choices=("mean", "first", "flatten")),
}

#: The verdict thresholds (the ``[thresholds]`` table).
THRESHOLDS: dict[str, Spec] = {
    "mild": UNIT, "strong": UNIT, "require_separation": BOOL, "probe_gap": UNIT, "probe_floor": UNIT,
    "combination_floor": UNIT, "noise_calibration": Spec("float", minimum=-1.0, maximum=1.0),
    "deployment_drop": UNIT, "ood_margin": UNIT,
}

#: A diagnostic parameter annotated with one of these types is checked as that kind.
_ANNOTATIONS = {"int": Spec("int"), "float": Spec("float"), "bool": BOOL, "str": Spec("str")}


def check_fields(values: Mapping[str, Any], specs: Mapping[str, Spec], name: Callable[[str], str]) -> dict[str, Any]:
    """Check every key of ``values`` that ``specs`` knows; the checked values (keys without a spec unchanged).

    ``name(key)`` is how the setting is called in a message (``--bootstrap``, ``bootstrap in mmdiag.toml``).
    """
    return {k: (specs[k].check(v, name(k)) if k in specs else v) for k, v in values.items()}


def check_annotated(value: Any, annotation: Any, name: str) -> Any:
    """Check a dataclass field's value against its simple annotation (``int``, ``float``, ``bool``, ``str``)."""
    spec = _ANNOTATIONS.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
    return value if spec is None else spec.check(value, name)
