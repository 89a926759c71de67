"""Checkpoint layouts users produce every day: Lightning .ckpt, DDP / torch.compile prefixes, the
--checkpoint-key / --strip-prefix overrides, and the refusals that keep loading safe and never
silently wrong (Hugging Face style folders: test_checkpoint_folders.py)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mmdiag.cli.app import app
from mmdiag.errors import ConfigError, LoadError
from mmdiag.loading import checkpoint_settings, load_checkpoint
from mmdiag.examples_data.synthetic import ToyNet
from tests.helpers.toys import DOMINANT, toy_split, trained_toy


class TwoModal(nn.Module):
    """Two encoders, a BatchNorm (with its num_batches_tracked counter) and a fusion head."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.audio = nn.Linear(3, hidden)
        self.video = nn.Linear(5, hidden)
        self.norm = nn.BatchNorm1d(2 * hidden)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.cat([self.audio(audio), self.video(video)], 1)))


class Wrapper(nn.Module):
    """A model whose own keys start with ``model.`` (its attribute), as many training wrappers do."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TwoModal()


def _state(seed: int, model: type[nn.Module] = TwoModal) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    mine = model.state_dict()
    return set(mine) == set(state) and all(torch.equal(mine[k], state[k]) for k in state)


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _lightning(state_dict: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A checkpoint laid out as Lightning writes one (the entries of Trainer.save_checkpoint)."""
    ckpt: dict[str, Any] = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0", "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.25),
                                                                 "dirpath": "ckpts", "best_model_path": "a.ckpt"}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(3)}},
                              "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0]}]}],
        "lr_schedulers": [], "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.001, "hidden": 4, "modalities": ["audio", "video"]},
    }
    ckpt.update(extra)
    return ckpt


# -------------------- Lightning checkpoints and prefixes


@pytest.mark.parametrize("attribute", ["model", "net", "backbone", "classifier_2"])
def test_lightning_ckpt_strips_the_module_attribute(tmp_path: Path, attribute: str) -> None:
    state = _state(1)
    torch.save(_lightning(_prefixed(state, attribute + ".")), tmp_path / "x.ckpt")
    model = TwoModal()
    info = load_checkpoint(model, tmp_path / "x.ckpt")
    assert _same(model, state)
    assert (info.format, info.layout, info.wrapper) == ("torch", "lightning", "state_dict")
    assert info.stripped_prefix == attribute + "." and info.dropped == ()
    assert checkpoint_settings(info) == {
        "checkpoint_format": "torch", "checkpoint_layout": "lightning", "checkpoint_key": "state_dict",
        "checkpoint_prefix_stripped": attribute + ".", "checkpoint_keys_dropped": 0,
    }


def test_lightning_module_extras_are_dropped_and_reported(tmp_path: Path) -> None:
    state = _state(2)
    sd = _prefixed(state, "model.")
    sd["loss_fn.weight"] = torch.ones(2)  # a weighted CrossEntropyLoss kept on the LightningModule
    sd.update(_prefixed({"weight": torch.zeros(9, 9)}, "teacher.proj."))  # another architecture
    torch.save(_lightning(sd), tmp_path / "x.ckpt")
    model = TwoModal()
    info = load_checkpoint(model, tmp_path / "x.ckpt")
    assert _same(model, state)
    assert info.stripped_prefix == "model."
    assert sorted(info.dropped) == ["loss_fn.weight", "teacher.proj.weight"]
    assert checkpoint_settings(info)["checkpoint_keys_dropped"] == 2


def test_keys_are_dropped_only_from_other_lightning_modules(tmp_path: Path) -> None:
    state = _state(25)
    # a plain training dict: extra keys mean another architecture unless the user says otherwise
    sd = {**_prefixed(state, "model."), "loss_fn.weight": torch.ones(2)}
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "plain.pt")
    with pytest.raises(LoadError) as e:
        load_checkpoint(TwoModal(), tmp_path / "plain.pt")
    msg = str(e.value)
    assert "Stripping 'model.' supplies all of the model's keys" in msg and "`strip_prefix='model.'`" in msg
    model = TwoModal()
    info = load_checkpoint(model, tmp_path / "plain.pt", strip_prefix="model.")
    assert _same(model, state) and info.dropped == ("loss_fn.weight",) and info.layout == "wrapped"
    # in a Lightning checkpoint too, a sub-network of a larger model under the same attribute is
    # never loaded on its own: the rest of 'model.' would be thrown away
    sd = {**_prefixed(state, "model.fusion."), "model.third_branch.weight": torch.ones(3)}
    torch.save(_lightning(sd), tmp_path / "x.ckpt")
    with pytest.raises(LoadError, match="Stripping 'model.fusion.' supplies all"):
        load_checkpoint(TwoModal(), tmp_path / "x.ckpt")


PREFIXES = ["module.", "_orig_mod.", "model.module.", "model._orig_mod.", "_orig_mod.module.",
            "module._orig_mod.", "model.module._orig_mod.", "net._orig_mod.module."]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("layout", ["bare", "lightning"])
def test_nested_prefixes_in_any_combination(tmp_path: Path, prefix: str, layout: str) -> None:
    state = _state(3)
    sd = _prefixed(state, prefix)
    torch.save(sd if layout == "bare" else _lightning(sd), tmp_path / "w.pt")
    model = TwoModal()
    info = load_checkpoint(model, tmp_path / "w.pt")
    assert _same(model, state) and info.stripped_prefix == prefix and info.dropped == ()
    assert info.layout == ("state-dict" if layout == "bare" else "lightning")


def test_model_keys_that_share_the_prefix(tmp_path: Path) -> None:
    state = _state(4, Wrapper)  # keys model.audio.weight, ...
    torch.save(state, tmp_path / "plain.pt")
    model = Wrapper()
    info = load_checkpoint(model, tmp_path / "plain.pt")
    assert _same(model, state) and info.stripped_prefix is None  # nothing stripped: keys match as they are
    torch.save(_lightning(_prefixed(state, "model.")), tmp_path / "x.ckpt")  # model.model.audio.weight
    model = Wrapper()
    info = load_checkpoint(model, tmp_path / "x.ckpt")
    assert _same(model, state) and info.stripped_prefix == "model."


def test_num_batches_tracked_may_be_absent(tmp_path: Path) -> None:
    state = _state(5)
    torch.save(_lightning({k: v for k, v in _prefixed(state, "model.").items() if "num_batches" not in k}),
               tmp_path / "x.ckpt")
    model = TwoModal()
    assert load_checkpoint(model, tmp_path / "x.ckpt").stripped_prefix == "model."
    assert torch.equal(model.head.weight, state["head.weight"])


def test_two_matching_prefixes_are_an_error_not_a_guess(tmp_path: Path) -> None:
    student, teacher = _state(6), _state(7)
    torch.save(_lightning({**_prefixed(student, "student."), **_prefixed(teacher, "teacher.")}), tmp_path / "x.ckpt")
    model = TwoModal()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadError) as e:
        load_checkpoint(model, tmp_path / "x.ckpt")
    msg = str(e.value)
    assert "'student.'" in msg and "'teacher.'" in msg and "`strip_prefix=" in msg
    assert _same(model, before)
    info = load_checkpoint(model, tmp_path / "x.ckpt", strip_prefix="teacher.")
    assert _same(model, teacher) and info.stripped_prefix == "teacher."
    assert len(info.dropped) == len(student)


def test_no_prefix_fits_message_lists_keys_and_candidates(tmp_path: Path) -> None:
    state = _state(8)
    sd = _prefixed(state, "model.")
    del sd["model.head.bias"]
    sd["model.extra.weight"] = torch.zeros(2)
    sd["loss_fn.weight"] = torch.ones(2)
    torch.save(_lightning(sd), tmp_path / "x.ckpt")
    model = TwoModal()
    with pytest.raises(LoadError) as e:
        load_checkpoint(model, tmp_path / "x.ckpt")
    msg = " ".join(str(e.value).split())
    assert "x.ckpt" in msg and "head.bias" in msg and "extra.weight" in msg
    assert "Prefixes tried: no prefix" in msg and "'model.'" in msg and "'loss_fn.'" in msg
    assert "The closest, 'model.'" in msg
    assert "`strip_prefix=PREFIX`" in msg and "`key=KEY`" in msg
    info = load_checkpoint(model, tmp_path / "x.ckpt", strict=False)  # what fits, listed
    assert info.stripped_prefix == "model." and info.missing == ("head.bias",)
    assert set(info.unexpected) == {"extra.weight", "loss_fn.weight"}
    assert torch.equal(model.audio.weight, state["audio.weight"])
    sd = _prefixed(state, "model.")  # names fit, a shape does not
    sd["model.audio.weight"] = torch.zeros(4, 7)
    torch.save(_lightning(sd), tmp_path / "y.ckpt")
    with pytest.raises(LoadError) as e:
        load_checkpoint(TwoModal(), tmp_path / "y.ckpt")
    msg = str(e.value)
    assert "after stripping 'model.'" in msg and "audio.weight: checkpoint (4, 7) vs model (4, 3)" in msg


# -------------------- Refusals: weights_only stays on


class Hostile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # unpickling would create the target file
        return (open, (self.target, "w"))


def test_lightning_hyper_parameters_objects_are_refused_and_named(tmp_path: Path) -> None:
    state = _state(10)
    marker = tmp_path / "pwned.txt"
    hp = {"lr": 0.001, "args": argparse.Namespace(lr=0.001), "hook": Hostile(str(marker))}
    torch.save(_lightning(_prefixed(state, "model."), hyper_parameters=hp), tmp_path / "x.ckpt")
    model = TwoModal()
    with pytest.raises(LoadError) as e:
        load_checkpoint(model, tmp_path / "x.ckpt")
    msg = " ".join(str(e.value).split())
    assert not marker.exists(), "the checkpoint's code ran"
    assert "its weights under 'state_dict' are plain tensors" in msg
    assert "'hyper_parameters'" in msg and "Lightning" in msg
    assert "argparse.Namespace" in msg and "`trust=True`" in msg
    info = load_checkpoint(model, tmp_path / "x.ckpt", trust=True)
    assert _same(model, state) and info.stripped_prefix == "model." and info.layout == "lightning"


def test_objects_among_the_weights_get_the_plain_refusal(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    sd = _prefixed(_state(11), "model.")
    sd["model.evil"] = Hostile(str(marker))
    torch.save(_lightning(sd), tmp_path / "x.ckpt")
    with pytest.raises(LoadError) as e:
        load_checkpoint(TwoModal(), tmp_path / "x.ckpt")
    msg = " ".join(str(e.value).split())
    assert not marker.exists()
    assert "contains Python objects other than tensors" in msg and "io.open" in msg
    assert "`trust=True`" in msg and "plain tensors" not in msg


# -------------------- Overrides: --checkpoint-key and --strip-prefix


def test_checkpoint_key_picks_the_ema_weights(tmp_path: Path) -> None:
    raw, ema = _state(18), _state(19)
    torch.save({"state_dict": raw, "ema_state_dict": ema, "epoch": 9}, tmp_path / "w.pt")
    model = TwoModal()
    assert load_checkpoint(model, tmp_path / "w.pt").wrapper == "state_dict" and _same(model, raw)
    info = load_checkpoint(model, tmp_path / "w.pt", key="ema_state_dict")
    assert info.wrapper == "ema_state_dict" and _same(model, ema)


def test_checkpoint_key_dotted_path(tmp_path: Path) -> None:
    state = _state(20)
    torch.save({"model": {"state_dict": _prefixed(state, "module."), "step": 3}, "epoch": 1}, tmp_path / "w.pt")
    model = TwoModal()
    info = load_checkpoint(model, tmp_path / "w.pt", key="model.state_dict")
    assert info.wrapper == "model.state_dict" and info.stripped_prefix == "module." and _same(model, state)
    with pytest.raises(LoadError) as e:
        load_checkpoint(model, tmp_path / "w.pt", key="model.ema")
    msg = str(e.value)
    assert "'ema'" in msg and "under 'model'" in msg and "'state_dict'" in msg and "`key`" in msg
    with pytest.raises(LoadError, match="'epoch' .*holds a builtins.int"):
        load_checkpoint(model, tmp_path / "w.pt", key="epoch")


def test_checkpoint_key_on_a_bare_state_dict_or_folder(tmp_path: Path) -> None:
    torch.save(_state(21), tmp_path / "w.pt")
    with pytest.raises(LoadError, match="bare state dict"):
        load_checkpoint(TwoModal(), tmp_path / "w.pt", key="state_dict")
    from safetensors.torch import save_file

    save_file(_state(21), str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="folder"):
        load_checkpoint(TwoModal(), tmp_path, key="state_dict")


def test_single_state_dict_under_any_key_and_several_need_a_key(tmp_path: Path) -> None:
    state = _state(22)
    torch.save({"weights": state, "epoch": 2}, tmp_path / "one.pt")
    model = TwoModal()
    assert load_checkpoint(model, tmp_path / "one.pt").wrapper == "weights" and _same(model, state)
    torch.save({"weights": state, "ema": _state(23)}, tmp_path / "two.pt")
    with pytest.raises(LoadError, match="several state dicts.*`key`"):
        load_checkpoint(model, tmp_path / "two.pt")


def test_strip_prefix_exactly(tmp_path: Path) -> None:
    state = _state(24)
    torch.save(_lightning(_prefixed(state, "model.")), tmp_path / "x.ckpt")
    for given in ("model.", "model"):  # the trailing dot may be left out
        model = TwoModal()
        info = load_checkpoint(model, tmp_path / "x.ckpt", strip_prefix=given)
        assert info.stripped_prefix == "model." and _same(model, state)
    with pytest.raises(LoadError) as e:
        load_checkpoint(TwoModal(), tmp_path / "x.ckpt", strip_prefix="net.")
    msg = str(e.value)
    assert "none of its" in msg and "'model.'" in msg and "`strip_prefix`" in msg
    torch.save(_lightning(_prefixed(state, "model.module.")), tmp_path / "y.ckpt")
    with pytest.raises(LoadError) as e:  # exactly that prefix: module.audio.weight does not fit
        load_checkpoint(TwoModal(), tmp_path / "y.ckpt", strip_prefix="model.")
    msg = str(e.value)
    assert "after stripping 'model.'" in msg and "came from `strip_prefix`" in msg


# -------------------- Through the CLI


MODEL_PY = textwrap.dedent('''
    from mmdiag.examples_data.synthetic import ToyNet

    def toy():
        return ToyNet(["audio", "visual"])
''')
FAST = ["--bootstrap", "20", "--only", "unimodal,shapley", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("layouts")
    (d / "m.py").write_text(MODEL_PY)
    train, test = toy_split(DOMINANT, 0)
    np.savez(d / "train.npz", **train)
    np.savez(d / "test.npz", **test)
    state = trained_toy(DOMINANT, 0).state_dict()
    torch.save(_lightning(_prefixed(state, "model.")), d / "x.ckpt")
    torch.save(_lightning({**_prefixed(state, "student."), **_prefixed(ToyNet(["audio", "visual"]).state_dict(),
                                                                           "teacher.")},
                          ema_state_dict=_prefixed(state, "model.")), d / "two.ckpt")
    return d


def _analyze(ws: Path, out: str, *extra: str) -> Any:
    args = ["analyze", "--model", f"{ws}/m.py:toy", "--data", f"{ws}/test.npz", "--out", str(ws / out), *FAST, *extra]
    return CliRunner().invoke(app, args)


def test_cli_analyze_lightning_ckpt_records_the_layout(ws: Path) -> None:
    res = _analyze(ws, "o1", "--checkpoint", str(ws / "x.ckpt"))
    assert res.exit_code == 0, res.output
    report = json.loads((ws / "o1" / "report.json").read_text())
    s = report["settings"]
    assert s["checkpoint_format"] == "torch" and s["checkpoint_layout"] == "lightning"
    assert s["checkpoint_key"] == "state_dict" and s["checkpoint_prefix_stripped"] == "model."
    assert s["checkpoint_keys_dropped"] == 0
    assert report["verdict"]["dominant"] == "audio"  # the trained weights, not a fresh model


def test_cli_overrides_by_flag_and_config(ws: Path) -> None:
    res = _analyze(ws, "o2", "--checkpoint", str(ws / "two.ckpt"))
    assert res.exit_code == 2
    assert "--strip-prefix" in " ".join(res.output.split())
    res = _analyze(ws, "o2", "--checkpoint", str(ws / "two.ckpt"), "--strip-prefix", "student.")
    assert res.exit_code == 0, res.output
    s = json.loads((ws / "o2" / "report.json").read_text())["settings"]
    assert s["checkpoint_prefix_stripped"] == "student." and s["checkpoint_keys_dropped"] > 0
    cfg = ws / "ema.toml"
    cfg.write_text('checkpoint-key = "ema_state_dict"\nstrip_prefix = "model."\n')
    res = _analyze(ws, "o3", "--checkpoint", str(ws / "two.ckpt"), "--config", str(cfg))
    assert res.exit_code == 0, res.output
    s = json.loads((ws / "o3" / "report.json").read_text())["settings"]
    assert s["checkpoint_key"] == "ema_state_dict" and s["checkpoint_prefix_stripped"] == "model."
    assert s["checkpoint_keys_dropped"] == 0


def test_cli_rebalance_takes_the_overrides(ws: Path) -> None:
    old = os.getcwd()
    os.chdir(ws)
    try:
        res = CliRunner().invoke(app, [
            "rebalance", "--model", "m.py:toy", "--checkpoint", "two.ckpt", "--checkpoint-key", "ema_state_dict",
            "--data", "train.npz", "--val-data", "test.npz", "--out", "rb", "--fix", "none", "--epochs", "1",
            "--device", "cpu", "--bootstrap", "20", "--only", "unimodal", "--format", "json", "--quiet"])
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output
    s = json.loads((ws / "rb" / "before" / "report.json").read_text())["settings"]
    assert s["checkpoint_key"] == "ema_state_dict" and s["checkpoint_prefix_stripped"] == "model."
    saved = json.loads((ws / "rb" / "run.json").read_text())["options"]
    assert saved["checkpoint_key"] == "ema_state_dict" and saved["strip_prefix"] is None


# -------------------- A checkpoint written by a real lightning.Trainer


def test_real_lightning_trainer_checkpoint(tmp_path: Path) -> None:
    try:
        import lightning as L
    except ImportError:
        pytest.skip("the lightning package is not installed; install it to check a checkpoint written by "
                    "lightning.Trainer (the hand-built Lightning layouts above run without it)")

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = TwoModal()
            self.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            a, v, y = batch
            return self.loss_fn(self.model(a, v), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randn(32, 5), torch.randint(0, 2, (32,)))
    module = Module()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    model = TwoModal()
    info = load_checkpoint(model, tmp_path / "real.ckpt")
    assert info.layout == "lightning" and info.stripped_prefix == "model."
    assert info.dropped == ("loss_fn.weight",)
    assert _same(model, module.model.state_dict())
