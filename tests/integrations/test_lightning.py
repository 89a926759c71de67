"""The Lightning callbacks (mmdiag.integrations.lightning) with a real ``lightning.Trainer`` on CPU."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="lightning is not installed (pip install mmdiag[lightning])")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mmdiag.adapter import ModelAdapter  # noqa: E402
from mmdiag.examples_data.synthetic import ToyNet  # noqa: E402
from mmdiag.integrations.lightning import DiagnoseCallback, RebalanceCallback, RebalanceMixin  # noqa: E402
from mmdiag.loading import dataset_from_arrays  # noqa: E402
from mmdiag.specs import TrainSpec  # noqa: E402
from mmdiag.train import fit  # noqa: E402
from tests.helpers.fit_order import FitOrder  # noqa: E402
from tests.helpers.toys import DOMINANT, toy_split  # noqa: E402

MODS = ("audio", "visual")
ROOT = Path(__file__).resolve().parents[2]
N_TRAIN = 160  # a small slice of the toy: 3 batches of 64 (the last one short), as fit batches it


class ToyModule(RebalanceMixin, pl.LightningModule):
    def __init__(self, model: torch.nn.Module, spec: TrainSpec, fail_at: int | None = None) -> None:
        super().__init__()
        self.model, self.spec, self.fail_at = model, spec, fail_at

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("boom")
        logits = self.model({m: batch[m] for m in MODS})
        loss = F.cross_entropy(logits, batch["label"])
        return self.rebalance_loss(batch, logits, loss)

    def validation_step(self, batch, batch_idx):
        logits = self.model({m: batch[m] for m in MODS})
        self.log("val_loss", F.cross_entropy(logits, batch["label"]))

    def configure_optimizers(self):  # fit's optimizer for TrainSpec(optimizer="sgd")
        s = self.spec
        return torch.optim.SGD(self.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def train_rows() -> dict:
    train = toy_split(DOMINANT, 0)[0]
    return {k: v[:N_TRAIN] for k, v in train.items()}


def new_model(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet(list(MODS))


def loader(spec: TrainSpec, rows: dict | None = None) -> DataLoader:
    ds = dataset_from_arrays(rows or train_rows())
    # generator=: the loader's worker base seed is drawn from it, not from the global generator
    return DataLoader(ds, batch_size=spec.batch_size, sampler=FitOrder(len(ds), spec.seed), num_workers=0,
                      generator=torch.Generator())


def trainer(tmp_path: Path, epochs: int, callbacks: list, **kw) -> pl.Trainer:
    opts = dict(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                num_sanity_val_steps=0)
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def hooks_of(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_forward_hooks_with_kwargs", {})) for m in model.modules())


SPEC = TrainSpec(epochs=2, optimizer="sgd", lr=0.05, batch_size=64, seed=0, device="cpu")


def test_ogm_ge_in_lightning_matches_fit_exactly(tmp_path):
    rows = train_rows()
    ref = new_model()
    fit(ModelAdapter(ref, MODS), rows, SPEC, fix=__import__("mmdiag").FIXES.get("ogm_ge")(alpha=0.8))

    model = new_model()
    cb = RebalanceCallback("ogm_ge", MODS, alpha=0.8)
    torch.manual_seed(SPEC.seed)  # fit seeds the global generator (the fix's gradient noise) the same way
    trainer(tmp_path, SPEC.epochs, [cb]).fit(ToyModule(model, SPEC), loader(SPEC, rows))

    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs by {float((a - b).abs().max())}"
    assert cb.fix.state_dict()["count"] == 3  # batches of the last epoch
    assert hooks_of(model) == 0


def test_the_fix_changes_training(tmp_path):
    """Control for the test above: without the fix the weights differ (the callback did act)."""
    ref = new_model()
    fit(ModelAdapter(ref, MODS), train_rows(), SPEC, fix=__import__("mmdiag").FIXES.get("ogm_ge")(alpha=0.8))
    model = new_model()
    torch.manual_seed(SPEC.seed)
    trainer(tmp_path, SPEC.epochs, []).fit(ToyModule(model, SPEC), loader(SPEC))
    assert not torch.equal(ref.head.weight, model.head.weight)


def test_no_hook_remains_after_an_exception(tmp_path):
    model = new_model()
    cb = RebalanceCallback("ogm_ge", MODS)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, 2, [cb]).fit(ToyModule(model, SPEC, fail_at=2), loader(SPEC))
    assert cb.ctx is None and hooks_of(model) == 0


def test_loss_fix_goes_through_the_mixin(tmp_path):
    model = new_model()
    cb = RebalanceCallback("modality_dropout", MODS)
    trainer(tmp_path, 1, [cb]).fit(ToyModule(model, SPEC), loader(SPEC))
    assert hooks_of(model) == 0


def test_resume_restores_the_fix_state(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                        filename="{epoch}")
    cb = RebalanceCallback("ogm_ge", MODS)
    trainer(tmp_path, 1, [cb, ckpt], enable_checkpointing=True).fit(ToyModule(new_model(), SPEC), loader(SPEC))
    saved = cb.fix.state_dict()
    assert saved["epoch"] == 0 and saved["count"] == 3 and saved["sums"]
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    stored = torch.load(path, weights_only=False)["callbacks"][cb.state_key]
    assert stored["state"] == saved

    resumed = RebalanceCallback("ogm_ge", MODS)
    seen = {}

    class Peek(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen:  # after RebalanceCallback's first-batch set-up, before any new step
                seen.update(resumed.fix.state_dict())

    trainer(tmp_path, 2, [resumed, Peek()]).fit(ToyModule(new_model(1), SPEC), loader(SPEC), ckpt_path=str(path))
    assert seen == saved
    assert resumed.fix.state_dict()["epoch"] == 1

    with pytest.raises(Exception, match="fix"):
        other = RebalanceCallback("ogm_ge", MODS)
        other.load_state_dict({**stored, "fix": "cal"})


@pytest.mark.parametrize("fix", ["modality_dropout", "cal"])
def test_resume_from_a_lightning_checkpoint_is_exact(tmp_path, fix):
    """2 epochs straight == resume after epoch 1 from the straight run's own checkpoint: weights, the
    fix's auxiliary modules and state. modality_dropout draws a random combination per sample from the
    global generator (restored from the checkpoint); cal adds auxiliary modules whose optimizer groups
    Lightning could not restore into an optimizer that does not hold them yet."""
    rows = train_rows()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    straight_model, straight = new_model(), RebalanceCallback(fix, MODS)
    torch.manual_seed(SPEC.seed)
    trainer(tmp_path, 2, [straight, ckpt], enable_checkpointing=True).fit(ToyModule(straight_model, SPEC), loader(SPEC, rows))

    resumed_model, resumed = new_model(1), RebalanceCallback(fix, MODS)
    torch.manual_seed(12345)  # whatever the generators hold now: the checkpoint's are put back
    trainer(tmp_path, 2, [resumed]).fit(ToyModule(resumed_model, SPEC), loader(SPEC, rows),
                                        ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), f"{fix}: {name} differs by {float((a - b).abs().max())}"
    aux_a, aux_b = straight.state_dict()["aux"], resumed.state_dict()["aux"]
    assert aux_a.keys() == aux_b.keys() and (fix != "cal" or aux_a)
    for key in aux_a:
        assert torch.equal(aux_a[key], aux_b[key]), f"{fix}: aux {key} differs"
    assert repr(straight.fix.state_dict()) == repr(resumed.fix.state_dict())
    assert hooks_of(resumed_model) == 0


def test_without_the_saved_generators_resume_differs(tmp_path):
    """Control for the test above: the same resume with the generator state dropped from the checkpoint
    does not replay modality_dropout's draws, so the weights differ."""
    rows = train_rows()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    straight_model, straight = new_model(), RebalanceCallback("modality_dropout", MODS)
    torch.manual_seed(SPEC.seed)
    trainer(tmp_path, 2, [straight, ckpt], enable_checkpointing=True).fit(ToyModule(straight_model, SPEC), loader(SPEC, rows))
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)
    del saved["callbacks"][straight.state_key]["rng"]
    torch.save(saved, path)
    resumed_model = new_model(1)
    torch.manual_seed(12345)
    trainer(tmp_path, 2, [RebalanceCallback("modality_dropout", MODS)]).fit(
        ToyModule(resumed_model, SPEC), loader(SPEC, rows), ckpt_path=str(path))
    assert not torch.equal(straight_model.head.weight, resumed_model.head.weight)


def test_diagnose_callback_logs_to_csv(tmp_path):
    train, test = toy_split(DOMINANT, 0)
    val = {k: v[:128] for k, v in test.items()}
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    diag = DiagnoseCallback(val, modalities=MODS, bootstrap=20)
    val_loader = DataLoader(dataset_from_arrays(val), batch_size=64)
    trainer(tmp_path, 2, [diag], logger=logger).fit(ToyModule(new_model(), SPEC), loader(SPEC), val_loader)
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        header = next(csv.reader(fh))
    for key in ("unimodal.audio", "unimodal.visual", "shapley.audio", "shapley.visual", "balance",
                "verdict.severity"):
        assert key in header, header
    assert diag.path is not None and diag.path.parent == Path(logger.log_dir) and diag.path.is_file()


def test_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("lightning_callback", ROOT / "examples" / "lightning_callback.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lightning_callback"] = mod
    spec.loader.exec_module(mod)
    out = mod.main(["--epochs", "1", "--n", "300", "--out", str(tmp_path)])
    assert (Path(out["report"])).is_file()
    assert "verdict.severity" in out["metrics"]
