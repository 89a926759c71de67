"""Regenerate docs/cli.md from the typer app (run: python tools/gen_cli_docs.py).

tests/test_docs.py fails when docs/cli.md is out of date, so the reference never drifts.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

from mmdiag.cli.app import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

PREAMBLE = """## Exit codes

| code | meaning |
|---|---|
| 0 | success (`gate`: every rule passed or only warned) |
| 1 | a gate rule failed (`mmdiag gate`, `mmdiag analyze --gate`): a rule FAILed, or the report cannot answer it (ERROR). Nothing else exits 1 |
| 2 | everything else that stops a run: a flag or config value of the wrong type or out of range, an unknown config key, a file that does not load, a report of a schema version this mmdiag does not read, an exception raised by your own code (model factory, forward, dataset), an internal error of mmdiag |
| 130 | interrupted (Ctrl-C) |

Every error is one paragraph on stderr starting with `error:`, without a traceback; the global
`--debug` flag adds the traceback. An exception raised in your own code names its type, the file
and line where it was raised and what mmdiag was doing (`error: Your code raised AssertionError at
model.py:12 while running the model's forward: ...`). Any other exception is an internal error of
mmdiag (`error: internal error in mmdiag (TypeError: ...); rerun with --debug for the traceback and
report it`), also exit 2.

The library's messages name settings as Python code (`` `mask_at='input'` `` from
`mmdiag.analyze`); the command line prints them with its flags (`--mask-at input`), in errors,
warnings, notes and gate outcomes alike. Files the library writes (`report.json`,
`comparison.json`) keep the library's wording.

## Settings are checked by type and range

Every flag and every config key (top level, `[rebalance]`, `[collect]`, `[thresholds]`,
`[params.<diagnostic>]`) is checked against one schema before any model or data is loaded. A value
of the wrong type or out of range exits 2 with a message that names the flag or the key and the
config file, what it must be and what was found, e.g. `bootstrap in mmdiag.toml must be an integer
>= 0 (0 computes no intervals); found 'lots' (a string).` Types are strict: `"yes"` is not a
boolean, `1.5` is not an integer and a quoted `"1e-3"` is not a number. Unknown keys name the
closest known one. Ranges:

| setting | must be |
|---|---|
| `bootstrap`, `seed`, `num_workers`, `max_probe_samples` | integer >= 0 |
| `batch_size`, `max_subsets`, `epochs`, `num_classes` | integer >= 1 |
| `lr`, `grad_clip` | number > 0 |
| `weight_decay`, `momentum` | number >= 0 |
| `mask`, `mask_at`, `call`, `nan_policy`, `balance_of`, `optimizer`, `init` | one of the words listed below |
| `device` | `auto`, `cpu`, `mps`, `cuda` or `cuda:N` |
| `trust_checkpoint`, `overwrite`, `per_sample`, `save_evidence`, `run_gate` (`--gate`), `rebalance`'s `baseline` | true or false |
| `modalities`, `only`, `skip`, `format` | a comma-separated string, or in a config a list of strings |
| `[collect]` fractions (`grad_fraction`, `param_grad_fraction`, `attribution_fraction`, `noise_fraction`) | number in (0, 1] |
| `[thresholds]` `mild`, `strong`, `probe_gap`, `probe_floor`, `combination_floor` | number in [0, 1] (and `mild <= strong`) |
| `[params.<diagnostic>]` values | the type of the parameter (see the diagnostic's page) |

The Python API applies the same checks: `CollectSettings`, `VerdictThresholds` and
`mmdiag.analyze(bootstrap=..., seed=...)` raise `ConfigError` on a bad value.
"""


def render() -> str:
    group = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from the command definitions by `tools/gen_cli_docs.py`.", "",
             PREAMBLE, "Global options: `--version`, `--debug`.", ""]
    for name in sorted(group.commands):
        cmd = group.commands[name]
        lines += [f"## `mmdiag {name}`", "", inspect.cleandoc(cmd.help or "").split("\n\n")[0], "",
                  "| option | default | meaning |", "|---|---|---|"]
        for p in cmd.params:
            if p.name == "help":
                continue
            flags = ", ".join(f"`{o}`" for o in (p.opts + p.secondary_opts)) if p.opts and p.opts[0].startswith("-") else f"`{p.name.upper()}`"
            default = p.default if p.default not in (None, (), []) else ""
            if callable(default):
                default = ""
            text = (getattr(p, "help", None) or "").replace("|", "\\|")
            lines.append(f"| {flags} | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    DOC.write_text(render())
    sys.stdout.write(f"wrote {DOC}\n")
