"""The library names settings; the command line shows flags.

Messages raised or recorded outside ``mmdiag/cli/`` name a setting in backquotes as Python code
(`mask_at='input'`); :func:`mmdiag.cli.flags.to_cli` writes them as flags (--mask-at input) for
everything the command line prints.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import typer

import mmdiag
from mmdiag.cli.app import app
from mmdiag.cli.flags import FLAGS, to_cli
from mmdiag.errors import ConfigError
from tests.helpers.cli_run import run

ROOT = Path(__file__).resolve().parents[1] / "mmdiag"


def cli_flags() -> set[str]:
    """Every long option of every ``mmdiag`` command."""
    group = typer.main.get_command(app)
    flags: set[str] = set()
    for command in [group, *getattr(group, "commands", {}).values()]:
        for param in command.params:
            flags.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return flags


def message_strings(path: Path):
    """(line, text) of every string in ``path`` that is not documentation (docstrings and bare
    string statements are skipped); f-strings give their literal parts."""
    tree = ast.parse(path.read_text())
    docs = {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_module_outside_the_cli_names_a_flag_in_a_message() -> None:
    flags = cli_flags()
    assert {"--encoder", "--mask-at", "--call", "--trust-checkpoint"} <= flags  # the scan knows the flags
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[0] == "cli":
            continue
        for line, text in message_strings(path):
            if re.search(r"mmdiag (analyze|rebalance|gate|compare|render|list|demo)\b", text):
                continue  # a command line shown to the user (the demo's next steps), not a message
            for token in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
                if token in flags:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {token} in {text[:60]!r}")
    assert not found, "name the setting in backquotes instead (see mmdiag.cli.flags):\n" + "\n".join(found)


def test_every_flag_of_the_table_exists() -> None:
    flags = cli_flags()
    for setting, flag in FLAGS.items():
        assert flag in flags or flag.startswith("["), (setting, flag)


@pytest.mark.parametrize("text, shown", [
    ("name them with `encoders={MODALITY: MODULE}`.", "name them with --encoder MODALITY=MODULE."),
    ("use `mask_at='input'`", "use --mask-at input"),
    ("pass `modalities=['audio', 'visual']`", "pass --modalities audio,visual"),
    ("Pass `trust=True` only if", "Pass --trust-checkpoint only if"),
    ("(check `only`/`skip`)", "(check --only/--skip)"),
    ("the analysis ran with `bootstrap=0`", "the analysis ran with --bootstrap 0"),
    ("(`key=KEY`)", "(--checkpoint-key KEY)"),
    ("see `mmdiag list fixes` and `not_a_setting`", "see `mmdiag list fixes` and `not_a_setting`"),
])
def test_to_cli_writes_settings_as_flags(text: str, shown: str) -> None:
    assert to_cli(text) == shown


MODEL_PY = textwrap.dedent('''
    import torch
    from torch import nn

    class Research(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_net = nn.Linear(4, 8)
            self.visual_net = nn.Linear(4, 8)
            self.fusion_head = nn.Linear(16, 3)
        def forward(self, audio_x, visual_x):
            return self.fusion_head(torch.cat([self.audio_net(audio_x), self.visual_net(visual_x)], 1))

    def build():
        return Research()
''')


def _data(n: int = 30) -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    return {"audio": g.normal(size=(n, 4)).astype(np.float32), "visual": g.normal(size=(n, 4)).astype(np.float32),
            "label": g.integers(0, 3, n)}


def test_python_shows_setting_names_and_the_cli_shows_flags(tmp_path: Path) -> None:
    """forward(audio_x, visual_x) with arrays audio and visual: the same refusal in both words."""
    (tmp_path / "net.py").write_text(MODEL_PY)
    np.savez(tmp_path / "data.npz", **_data())
    namespace: dict = {}
    exec(compile(MODEL_PY, "net.py", "exec"), namespace)
    torch.manual_seed(0)
    with pytest.raises(ConfigError) as info:
        mmdiag.analyze(namespace["build"](), _data(), bootstrap=0)
    said = str(info.value)
    assert "`call='positional'`" in said and "`modalities=['audio', 'visual']`" in said and "--" not in said

    res = run(["analyze", "--model", f"{tmp_path}/net.py:build", "--data", f"{tmp_path}/data.npz",
               "--out", tmp_path / "out", "--bootstrap", "0"])
    shown = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "--call positional passes the modalities in the order given by --modalities audio,visual" in shown
    assert "`" not in shown
