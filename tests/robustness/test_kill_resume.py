"""A training run killed with SIGKILL mid-run resumes from its last checkpoint to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmdiag.adapter import ModelAdapter
from mmdiag.fixes import FIXES
from mmdiag.examples_data.synthetic import ToyNet
from mmdiag.train import CHECKPOINT, fit, load_training_checkpoint
from tests.helpers.toys import DOMINANT, toy_split

MODS = ("audio", "visual")
ROOT = Path(__file__).resolve().parents[2]  # the child imports tests.helpers from here

SCRIPT = textwrap.dedent('''
    import time
    import torch
    torch.set_num_threads(1)
    from mmdiag.adapter import ModelAdapter
    from mmdiag.fixes import FIXES
    from mmdiag.examples_data.synthetic import ToyNet
    from mmdiag.train import fit
    from tests.helpers.toys import DOMINANT, toy_split

    def slow(progress):  # slow enough to be killed between checkpoints
        time.sleep(0.02)

    torch.manual_seed(0)
    train, val = toy_split(DOMINANT, 0)
    fit(ModelAdapter(ToyNet(["audio", "visual"]), ("audio", "visual")), train, val_data=val,
        fix=FIXES.get("ogm_ge")(), epochs=6, optimizer="sgd", lr=0.05, batch_size=64, seed=0,
        device="cpu", out_dir={out!r}, progress=slow)
''')


def _fit(model, out_dir, **kw):
    train, val = toy_split(DOMINANT, 0)
    return fit(ModelAdapter(model, MODS), train, val_data=val, fix=FIXES.get("ogm_ge")(), epochs=6,
               optimizer="sgd", lr=0.05, batch_size=64, seed=0, device="cpu", out_dir=out_dir, **kw)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(out=str(out))], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpt = out / CHECKPOINT
            if ckpt.exists() and load_training_checkpoint(out)["epoch"] >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("the training finished before it could be killed")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    epoch = load_training_checkpoint(out)["epoch"]
    assert 2 <= epoch < 6, epoch
    # a kill during a write can leave a stray temporary file, never a half-written checkpoint:
    # load_training_checkpoint above read a complete one

    torch.manual_seed(123)
    resumed = ToyNet(list(MODS))
    _fit(resumed, out, resume=True)
    torch.manual_seed(0)
    straight = ToyNet(list(MODS))
    _fit(straight, tmp_path / "straight")
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
