"""Settings named in the library's messages, shown as the command line's flags.

The library speaks Python: its messages name a setting in backquotes, alone or with a value written
as Python code -- `encoders`, `mask_at='input'`, `modalities=[a, b]`, `trust=True`,
`encoders={MODALITY: MODULE}`. Everything the command line shows (errors, warnings, notes, gate
outcomes) goes through :func:`to_cli`, which writes each reference to a setting of :data:`FLAGS` as
its flag: --encoder, --mask-at input, --modalities a,b, --trust-checkpoint, --encoder MODALITY=MODULE.
A backquoted name that is not a setting is left as it is. Files the library writes (report.json,
comparison.json) keep the library's wording.
"""

from __future__ import annotations

import re

__all__ = ["FLAGS", "to_cli"]

#: Setting name in the library's messages -> how the command line sets it.
FLAGS: dict[str, str] = {
    # driving the model
    "modalities": "--modalities", "call": "--call", "encoders": "--encoder", "head": "--head",
    "mask": "--mask", "mask_at": "--mask-at", "device": "--device",
    # loading
    "model": "--model", "model_kwargs": "[model_kwargs] of the config", "data": "--data",
    "nan_policy": "--nan-policy", "checkpoint": "--checkpoint", "trust": "--trust-checkpoint",
    "key": "--checkpoint-key", "strip_prefix": "--strip-prefix",
    # analysis
    "only": "--only", "skip": "--skip", "bootstrap": "--bootstrap", "max_subsets": "--max-subsets",
    "max_feature_samples": "--max-probe-samples",
    "missing": "--missing", "combinations": "[deployment] combinations", "ood_data": "--ood-data",
    # gate
    "bound": "--bound", "baseline": "--baseline",
    # training
    "optimizer": "--optimizer", "init": "--init", "fix": "--fix", "fix_params": "--fix-param", "out_dir": "--out",
    "grad_clip": "--grad-clip",
    # experiment trackers
    "log_to": "--log-to",
    # acquisition
    "budget": "--budget", "initial": "--initial", "rounds": "--rounds", "seeds": "--seeds",
    "resume": "--resume", "policy": "--policy",
    # several fixes (leaderboard, race)
    "objective": "--objective", "holdout": "--holdout", "jobs": "--jobs",
}

_REFERENCE = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


def to_cli(text: str) -> str:
    """``text`` with every backquoted setting of :data:`FLAGS` written as its flag (see the module doc)."""
    def swap(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        flag = FLAGS.get(name)
        if flag is None:
            return match.group(0)
        return flag if value is None else _with_value(flag, value.strip())

    return _REFERENCE.sub(swap, text)


def _with_value(flag: str, value: str) -> str:
    """``--flag VALUE`` from a Python value: True -> the switch alone, [a, b] -> a,b, {k: v} -> k=v."""
    if value == "True":
        return flag
    if value.startswith("{") and value.endswith("}"):
        pairs = [item.split(":", 1) for item in value[1:-1].split(",") if ":" in item]
        return " ".join(f"{flag} {_plain(k)}={_plain(v)}" for k, v in pairs)
    if value.startswith("[") and value.endswith("]"):
        return f"{flag} " + ",".join(_plain(item) for item in value[1:-1].split(",") if item.strip())
    return f"{flag} {_plain(value)}"


def _plain(text: str) -> str:
    """A Python literal as typed on the command line (quotes dropped)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text
