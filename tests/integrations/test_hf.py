"""The Hugging Face integration (mmdiag.integrations.hf) with a real ``transformers.Trainer`` on CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install mmdiag[hf])")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from mmdiag import FIXES  # noqa: E402
from mmdiag.adapter import ModelAdapter  # noqa: E402
from mmdiag.errors import MmdiagWarning  # noqa: E402
from mmdiag.examples_data.synthetic import ToyNet  # noqa: E402
from mmdiag.integrations.hf import FIX_STATE_FILE, DiagnoseCallback, MMDiagTrainer, RebalanceCallback  # noqa: E402
from mmdiag.loading import dataset_from_arrays  # noqa: E402
from mmdiag.specs import TrainSpec  # noqa: E402
from mmdiag.train import fit  # noqa: E402
from tests.helpers.fit_order import FitOrder  # noqa: E402
from tests.test_examples import load_module  # noqa: E402
from tests.helpers.toys import DOMINANT, toy_split  # noqa: E402

MODS = ("audio", "visual")
ROOT = Path(__file__).resolve().parents[2]
N_TRAIN = 160  # 3 batches of 64, the last one short, as fit batches it
SPEC = TrainSpec(epochs=2, optimizer="sgd", lr=0.05, batch_size=64, seed=0, device="cpu")


class HFToy(nn.Module):
    """ToyNet with a Hugging Face style forward: keyword inputs, ``labels``, a dict with loss and logits."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.net = ToyNet(list(MODS))
        self.fail_after, self.calls = fail_after, 0

    def forward(self, audio, visual, labels=None):
        if labels is not None and self.fail_after is not None:  # the Trainer's own calls
            self.calls += 1
            if self.calls > self.fail_after:
                raise RuntimeError("boom")
        logits = self.net({"audio": audio, "visual": visual})
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class EpochLoader(DataLoader):
    """The Trainer calls ``set_epoch`` on its loader each epoch; the order is then a function of the epoch,
    so a resumed run replays it."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class FitOrderMixin:
    """Train on fit's row order, with fit's optimizer (SGD, momentum 0.9) and a constant rate."""

    def get_train_dataloader(self):
        ds = self.train_dataset
        return EpochLoader(ds, batch_size=self.args.per_device_train_batch_size, sampler=FitOrder(len(ds), SPEC.seed),
                           collate_fn=self.data_collator, generator=torch.Generator())

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            s = SPEC
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=s.lr, momentum=s.momentum,
                                             weight_decay=s.weight_decay)
        return super().create_optimizer(model)


class FitTrainer(FitOrderMixin, MMDiagTrainer):
    pass


class PlainFitTrainer(FitOrderMixin, Trainer):
    pass


def rows() -> dict:
    train = toy_split(DOMINANT, 0)[0]
    return {k: v[:N_TRAIN] for k, v in train.items()}


def new_model(seed: int = 0, **kw) -> HFToy:
    torch.manual_seed(seed)
    return HFToy(**kw)


def arguments(tmp_path: Path, **kw) -> TrainingArguments:
    opts = dict(output_dir=str(tmp_path), num_train_epochs=SPEC.epochs, per_device_train_batch_size=SPEC.batch_size,
                per_device_eval_batch_size=128, learning_rate=SPEC.lr, lr_scheduler_type="constant", warmup_steps=0,
                max_grad_norm=0.0, seed=SPEC.seed, report_to="none", save_strategy="no", logging_strategy="no",
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    opts.update(kw)
    return TrainingArguments(**opts)


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_forward_hooks_with_kwargs", {})) for m in model.modules())


def fit_reference(fix: str, **params) -> HFToy:
    ref = new_model()
    fit(ModelAdapter(ref, MODS), rows(), SPEC, fix=FIXES.get(fix)(**params))
    return ref


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs by {float((x - y).abs().max())}"


@pytest.mark.parametrize("fix, params, trainer_cls", [
    ("ogm_ge", {"alpha": 0.8}, PlainFitTrainer),   # a gradient fix: the callback alone, in a plain Trainer
    ("modality_dropout", {}, FitTrainer),           # a loss fix (random draws): MMDiagTrainer.compute_loss
    ("cal", {}, FitTrainer),                        # a loss fix with auxiliary modules in the optimizer
])
def test_hf_trainer_matches_fit_exactly(tmp_path, fix, params, trainer_cls):
    ref = fit_reference(fix, **params)
    model = new_model()
    cb = RebalanceCallback(fix, MODS, **params)
    trainer = trainer_cls(model=model, args=arguments(tmp_path), train_dataset=dataset_from_arrays(rows()), callbacks=[cb])
    trainer.train()
    assert_same_weights(ref, model)
    assert hooks_of(model) == 0 and cb.ctx is None
    assert [h["epoch"] for h in cb.history] == [0.0, 1.0]


def test_the_fix_changes_training(tmp_path):
    """Control for the test above: the same run without the callback ends elsewhere."""
    ref = fit_reference("ogm_ge", alpha=0.8)
    model = new_model()
    PlainFitTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset_from_arrays(rows())).train()
    assert not torch.equal(ref.net.head.weight, model.net.head.weight)


def test_a_loss_fix_in_a_plain_trainer_is_refused(tmp_path):
    trainer = PlainFitTrainer(model=new_model(), args=arguments(tmp_path), train_dataset=dataset_from_arrays(rows()),
                              callbacks=[RebalanceCallback("modality_dropout", MODS)])
    with pytest.raises(Exception, match="MMDiagTrainer"):
        trainer.train()


def test_clipping_before_the_fix_is_warned(tmp_path):
    cb = RebalanceCallback("ogm_ge", MODS)
    trainer = PlainFitTrainer(model=new_model(), args=arguments(tmp_path, max_grad_norm=1.0, num_train_epochs=1),
                              train_dataset=dataset_from_arrays(rows()), callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any(issubclass(w.category, MmdiagWarning) and "max_grad_norm" in str(w.message) for w in caught)


def test_no_hook_remains_after_an_exception(tmp_path):
    model = new_model(fail_after=2)
    cb = RebalanceCallback("ogm_ge", MODS)
    trainer = FitTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset_from_arrays(rows()), callbacks=[cb])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert cb.ctx is None and hooks_of(model) == 0


@pytest.mark.parametrize("fix", ["modality_dropout", "cal"])
def test_resume_from_a_trainer_checkpoint_is_exact(tmp_path, fix):
    """2 epochs straight == resume from the straight run's checkpoint after epoch 1: the checkpoint folder
    holds the fix's state (mmdiag_fix.pt); the Trainer restores the generators (modality_dropout's draws);
    MMDiagTrainer sets cal up before the optimizer state, with its auxiliary groups, is loaded."""
    data = dataset_from_arrays(rows())
    straight_model, straight = new_model(), RebalanceCallback(fix, MODS)
    FitTrainer(model=straight_model, args=arguments(tmp_path, save_strategy="epoch"), train_dataset=data,
               callbacks=[straight]).train()
    saved = torch.load(tmp_path / "checkpoint-3" / FIX_STATE_FILE, weights_only=True)
    assert saved["fix"] == fix and (fix != "cal" or (saved["aux"] and saved["aux_groups"] == 2))

    resumed_model, resumed = new_model(1), RebalanceCallback(fix, MODS)
    torch.manual_seed(12345)  # whatever the generators hold now: the checkpoint's are put back
    FitTrainer(model=resumed_model, args=arguments(tmp_path / "resumed"), train_dataset=data,
               callbacks=[resumed]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert_same_weights(straight_model, resumed_model)
    a, b = straight.run.state_dict(), resumed.run.state_dict()
    assert repr(a["state"]) == repr(b["state"])
    assert all(torch.equal(a["aux"][k], b["aux"][k]) for k in a["aux"])
    assert [h["epoch"] for h in resumed.history] == [1.0]


def test_resume_without_the_fix_state_is_refused(tmp_path):
    data = dataset_from_arrays(rows())
    FitTrainer(model=new_model(), args=arguments(tmp_path, save_strategy="epoch", num_train_epochs=1),
               train_dataset=data, callbacks=[RebalanceCallback("ogm_ge", MODS)]).train()
    (tmp_path / "checkpoint-3" / FIX_STATE_FILE).unlink()
    trainer = FitTrainer(model=new_model(), args=arguments(tmp_path / "resumed"), train_dataset=data,
                         callbacks=[RebalanceCallback("ogm_ge", MODS)])
    with pytest.raises(Exception, match=FIX_STATE_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_diagnose_callback_adds_eval_metrics(tmp_path):
    train, test = toy_split(DOMINANT, 0)
    val = {k: v[:128] for k, v in test.items()}
    diag = DiagnoseCallback(val, modalities=MODS, bootstrap=20)
    trainer = Trainer(model=new_model(), args=arguments(tmp_path, num_train_epochs=1, eval_strategy="epoch"),
                      train_dataset=dataset_from_arrays(rows()), eval_dataset=dataset_from_arrays(val), callbacks=[diag])
    trainer.train()
    keys = ("eval_unimodal.audio", "eval_unimodal.visual", "eval_shapley.audio", "eval_shapley.visual", "eval_balance",
            "eval_verdict.severity")
    logged = next(h for h in trainer.state.log_history if "eval_loss" in h)
    for key in keys:
        assert key in logged, sorted(logged)
    assert logged["eval_unimodal.audio"] == diag.analysis.metrics(diag.report)["unimodal.audio"]
    metrics = trainer.evaluate()
    assert all(k in metrics for k in keys)
    assert diag.path is not None and diag.path.is_file()


def test_mmdiag_trainer_logs_diagnosis_to_the_loggers(tmp_path):
    """Under MMDiagTrainer the values are diagnosed before the evaluation is logged: on_log sees them."""
    from transformers import TrainerCallback

    seen: list[dict] = []

    class Catch(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    val = {k: v[:128] for k, v in toy_split(DOMINANT, 0)[1].items()}
    trainer = MMDiagTrainer(model=new_model(), args=arguments(tmp_path, num_train_epochs=1),
                            train_dataset=dataset_from_arrays(rows()), eval_dataset=dataset_from_arrays(val),
                            callbacks=[DiagnoseCallback(val, modalities=MODS, bootstrap=0), Catch()])
    trainer.evaluate()
    assert any("eval_shapley.audio" in logs and "eval_loss" in logs for logs in seen)


def test_example_runs(tmp_path):
    out = load_module(ROOT / "examples" / "hf_trainer.py", "hf_trainer").main(["--epochs", "1", "--n", "300", "--out", str(tmp_path)])
    assert Path(out["report"]).is_file()
    assert "eval_verdict.severity" in out["metrics"]
