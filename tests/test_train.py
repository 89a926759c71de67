"""train.fit: history, checkpoints, exact resume, Ctrl-C at a batch boundary, torch.distributed."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes import FIXES
from mmdiag.examples_data.synthetic import ToyNet
from mmdiag.train import CHECKPOINT, Interrupted, TrainProgress, evaluate, fit, load_training_checkpoint
from tests.helpers.toys import DOMINANT, toy_split

MODS = ("audio", "visual")


def _model(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet(list(MODS))


def _fit(model: nn.Module, fix_name: str = "ogm_ge", **kw: Any) -> Any:
    train, val = toy_split(DOMINANT, 0)
    settings = dict(epochs=3, optimizer="sgd", lr=0.05, batch_size=64, seed=0, device="cpu")
    settings.update(kw)
    return fit(ModelAdapter(model, MODS), train, val_data=val, fix=FIXES.get(fix_name)(), **settings)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_history_columns() -> None:
    hist = _fit(_model(), epochs=2)
    assert [r["epoch"] for r in hist.rows] == [0, 1]
    row = hist.last
    for key in ("loss", "lr", "val_loss", "val_accuracy", "unimodal_acc.audio", "unimodal_acc.visual",
                "signal.ratio.audio", "signal.coeff.visual", "time_s"):
        assert key in row, key
    assert row["val_accuracy"] > 0.8 and row["unimodal_acc.audio"] > row["unimodal_acc.visual"]
    frame = hist.to_frame()
    assert list(frame["epoch"]) == [0, 1]


def test_evaluate_matches_a_hand_count() -> None:
    from tests.helpers.toys import trained_toy

    model = trained_toy(DOMINANT, 0)
    _, val = toy_split(DOMINANT, 0)
    got = evaluate(ModelAdapter(model, MODS), val, batch_size=97)
    x = {m: torch.as_tensor(val[m]) for m in MODS}
    y = torch.as_tensor(val["label"])
    with torch.no_grad():
        assert got["val_accuracy"] == pytest.approx(float((model(x).argmax(1) == y).float().mean()))
        feats = {m: model.encoders[m](x[m]) for m in MODS}
        za = model.head(torch.cat([feats["audio"], torch.zeros_like(feats["visual"])], 1))
    assert got["unimodal_acc.audio"] == pytest.approx(float((za.argmax(1) == y).float().mean()))


def test_checkpoint_is_weights_only_and_complete(tmp_path: Path) -> None:
    _fit(_model(), epochs=1, out_dir=tmp_path, optimizer="adam", lr=0.01)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert {"model", "aux", "optimizer", "scheduler", "fix", "rng", "epoch", "batch", "history", "settings"} <= set(state)
    assert state["epoch"] == 1 and state["batch"] == 0
    assert isinstance(state["rng"]["torch"], torch.Tensor) and isinstance(state["rng"]["data"], torch.Tensor)
    assert isinstance(state["rng"]["numpy_keys"], torch.Tensor) and isinstance(state["rng"]["python_state"], torch.Tensor)
    assert state["settings"]["fix"] == "ogm_ge" and state["optimizer"]["state"]
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed


def test_resume_after_a_crash_gives_identical_weights(tmp_path: Path) -> None:
    """3 epochs straight == 1 epoch, crash, resume for the remaining 2 (torch.equal on every tensor)."""
    straight = _model()
    full = _fit(straight, out_dir=tmp_path / "a")

    def crash(p: TrainProgress) -> None:
        if p.stage == "epoch" and p.epoch == 0:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _fit(_model(), out_dir=tmp_path / "b", progress=crash)
    assert load_training_checkpoint(tmp_path / "b")["epoch"] == 1
    resumed = _model(seed=123)  # a different initialisation: the checkpoint must overwrite it
    hist = _fit(resumed, out_dir=tmp_path / "b", resume=True)
    _assert_same_weights(straight, resumed)
    assert hist.resumed_from == {"epoch": 1, "batch": 0}
    assert _strip_time(hist.rows) == _strip_time(full.rows)


@pytest.mark.parametrize("fix_name", ["modality_dropout", "agm"])
def test_sigint_checkpoints_at_a_batch_boundary_and_resumes_exactly(tmp_path: Path, fix_name: str) -> None:
    """The first Ctrl-C stops at the next batch boundary after saving that exact state (mid-epoch),
    and resuming reaches the weights of an uninterrupted run (with Adam and an LR schedule)."""
    def sched(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    kw = dict(fix_name=fix_name, optimizer="adam", lr=0.01, scheduler=sched)
    straight = _model()
    _fit(straight, out_dir=tmp_path / "a", **kw)

    def interrupt(p: TrainProgress) -> None:
        if p.stage == "batch" and p.epoch == 1 and p.batch == 3:
            signal.raise_signal(signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        _fit(_model(), out_dir=tmp_path / "b", progress=interrupt, **kw)
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is restored
    assert (info.value.epoch, info.value.batch) == (1, 3)
    assert isinstance(info.value, KeyboardInterrupt)
    saved = load_training_checkpoint(tmp_path / "b")
    assert (saved["epoch"], saved["batch"]) == (1, 3) and saved["partial"]["count"] == 3 * 64
    resumed = _model(seed=7)
    hist = _fit(resumed, out_dir=tmp_path / "b", resume=True, **kw)
    assert hist.resumed_from == {"epoch": 1, "batch": 3}
    _assert_same_weights(straight, resumed)


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path: Path) -> None:
    _fit(_model(), epochs=1, out_dir=tmp_path)
    with pytest.raises(TrainError, match="lr"):
        _fit(_model(), epochs=1, out_dir=tmp_path, resume=True, lr=0.1)
    with pytest.raises(TrainError, match="No training checkpoint"):
        _fit(_model(), out_dir=tmp_path / "empty", resume=True)
    with pytest.raises(TrainError, match="out_dir"):
        _fit(_model(), resume=True)


def test_a_finished_run_resumes_to_nothing(tmp_path: Path) -> None:
    model = _model()
    hist = _fit(model, epochs=1, out_dir=tmp_path)
    again = _model(seed=5)
    hist2 = _fit(again, epochs=1, out_dir=tmp_path, resume=True)
    _assert_same_weights(model, again)
    assert _strip_time(hist2.rows) == _strip_time(hist.rows)


@pytest.mark.parametrize("kw, match", [
    ({"optimizer": "rmsprop"}, "optimizer"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"),
    ({"epochs": -1}, "epochs"), ({"ddp_kwargs": {"find_unused_parameters": True}}, "find_unused"),
    ({"grad_clip": -1.0}, "grad_clip"),
])
def test_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _fit(_model(), **{"epochs": 1, **kw})


def test_divergence_is_a_train_error() -> None:
    with pytest.raises(TrainError, match="loss became"):
        _fit(_model(), fix_name="none", epochs=2, lr=1e6, optimizer="sgd")


def test_grad_clip_limits_the_update() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(model, fix_name="none", epochs=1, batch_size=600, lr=1.0, momentum=0.0, grad_clip=1e-3)
    step = torch.sqrt(sum(((model.state_dict()[k] - before[k]) ** 2).sum() for k in before))
    assert float(step) <= 1e-3 * 1.0001


# ------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, out: str, fixes: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mmdiag.runtime import process_group

    with process_group("cpu"):
        for name in fixes:
            model = _model(seed=rank)  # different per rank: DDP broadcasts rank 0's weights
            hist = _fit(model, fix_name=name, epochs=2, batch_size=32, out_dir=os.path.join(out, f"{name}-rank{rank}"))
            torch.save({"state": model.state_dict(), "rows": _strip_time(hist.rows)},
                       os.path.join(out, f"result-{name}-{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_with_gloo_end_with_equal_weights(tmp_path: Path) -> None:
    """2 CPU processes (gloo) train OGM-GE, AGM (three forwards per step through the DDP wrapper)
    and modality dropout: each finishes, only rank 0 writes its checkpoint, and both ranks end with
    identical weights and histories."""
    import torch.multiprocessing as mp

    fixes = ["ogm_ge", "agm", "modality_dropout"]
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), fixes), nprocs=2, join=True)
    for name in fixes:
        r0 = torch.load(tmp_path / f"result-{name}-0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"result-{name}-1.pt", weights_only=True)
        for k in r0["state"]:
            assert torch.equal(r0["state"][k], r1["state"][k]), (name, k)
        assert r0["rows"] == r1["rows"]
        assert (tmp_path / f"{name}-rank0" / CHECKPOINT).is_file()
        assert not (tmp_path / f"{name}-rank1").exists()
        ckpt = load_training_checkpoint(tmp_path / f"{name}-rank0")
        assert ckpt["settings"]["world_size"] == 2 and ckpt["epoch"] == 2


# ------------------------------------------------------------------------------------- example
def test_own_loop_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/own_loop.py: a user's loop adopting a fix with the three hook calls."""
    import runpy

    path = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"
    module = runpy.run_path(str(path), run_name="own_loop_example")
    metrics = module["main"](["--fix", "ogm_ge", "--param", "alpha=0.8", "--epochs", "2", "--n", "400"])
    assert set(metrics) >= {"fused", "audio-only", "visual-only"} and metrics["fused"] > 0.5
    out = capsys.readouterr().out
    assert "epoch 1:" in out and "coeff.audio" in out
