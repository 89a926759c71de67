"""The model zoo: mmdiag driven end to end through ``mmdiag analyze`` on model shapes that real
libraries and research code produce, checked against a brute-force reference.

Each case (``cases.CASES``) is a small model in ``zoo_models.py`` (in-place fusion, single-logit
binary heads, a Lightning checkpoint layout, transformer encoders with cross-attention,
embeddings of integer ids, ``nn.ModuleDict`` encoders with a dict forward, dict and dataclass
outputs, a shared siamese encoder, a presence-mask argument, a tuple-returning encoder, a black
box, three gated modalities). The test trains it for a few steps, saves its checkpoint and an
``.npz`` (one array per modality plus ``label``), runs the CLI on them, and compares
``report.json`` with ``reference.py``: a fresh model loaded from the same checkpoint without
mmdiag, with "modality m absent" done by forward hooks that return zeros in place of m's encoder
output (or by zeroed inputs for a black box), every coalition evaluated by a full forward, and
Shapley values averaged over all orders of the modalities. They must agree to 1e-6 on

* the fused accuracy (``accuracy``),
* each modality's unimodal accuracy (``diagnostics.unimodal.per_modality``),
* each modality's Shapley value (``diagnostics.shapley.per_modality``),

and no entry of ``failures`` may have kind ``error`` (in the fast run, and in one run of the
full default suite per model).

Feature-level masking is expected where the encoders are known. Where mmdiag decides it cannot
mask features and falls back to input masking, that is accepted only when the fallback is loud
(the console output says so) and ``settings.mask_at == "input"``; the numbers must then match the
zeroed-input reference instead.

Adding a model: write the module and a ``build_*`` factory in ``zoo_models.py`` (torch only, no
relative imports: mmdiag loads the file by path), then add a ``Case`` to ``cases.CASES`` with its
data spec (modalities in positional order), how to call it on a dict of tensors, how to read its
logits, and its encoder ``sites`` (module path and, for a module called more than once, the call
index of each modality; ``None`` for a black box). Keep it small: the whole zoo should run in about
a minute on two CPU cores.
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmdiag.cli.app import app

from .cases import CASES, CASES_BY_NAME, Case, Prepared, prepare
from .reference import Reference

TOL = 1e-6
runner = CliRunner()

FAST = ("--bootstrap", "50", "--only", "unimodal,shapley", "--device", "cpu")
FULL = ("--bootstrap", "50", "--device", "cpu")

#: how a loud fallback to input masking may be worded on the console
LOUD_FALLBACK = re.compile(
    r"input[- ]level masking|input masking|masking (the )?(raw )?inputs|masked at (the )?inputs?\b|mask[-_ ]at[ =]input",
    re.IGNORECASE)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    """Prepared cases, trained and written on first use."""
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[str, Prepared] = {}

    def get(name: str) -> Prepared:
        if name not in cache:
            cache[name] = prepare(CASES_BY_NAME[name], root / name)
        return cache[name]

    return get


def analyze(prep: Prepared, out: Path, extra: tuple[str, ...]) -> tuple[Any, dict | None]:
    args = ["analyze", "--model", prep.model_spec, "--checkpoint", str(prep.checkpoint), "--data", str(prep.data),
            "--out", str(out), *prep.case.cli, *extra]
    res = runner.invoke(app, args)
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.exists() else None
    return res, report


def run_text(res: Any) -> str:
    text = res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        text += "\n" + "".join(traceback.format_exception(*res.exc_info))
    return text


def console_text(res: Any) -> str:
    """Everything printed (stdout and stderr), with rich's line wrapping undone."""
    return " ".join(res.output.split())


def check_ran(res: Any, report: dict | None) -> dict:
    assert res.exit_code == 0 and report is not None, (
        f"mmdiag analyze exited {res.exit_code}:\n{run_text(res)[-3000:]}")
    errors = [f for f in report["failures"] if f.get("kind") == "error"]
    assert not errors, "diagnostics ended in kind 'error':\n" + "\n".join(
        f"  {f.get('diagnostic')}: {f.get('error')}" for f in errors)
    return report


def expected_reference(case: Case, prep: Prepared, res: Any, report: dict) -> Reference:
    """The reference mmdiag must match: feature-level, or input-level after a loud fallback."""
    settings = report["settings"]
    mask_at = settings.get("mask_at")
    notes = settings.get("adapter", {}).get("notes")
    if case.sites is None:
        assert mask_at == "input", f"black box analysed with mask_at={mask_at!r}; notes: {notes}"
        return prep.input_ref
    if mask_at == "feature":
        assert settings["adapter"]["encoders"] == case.expected_encoders, (
            f"encoders {settings['adapter']['encoders']} != expected {case.expected_encoders}")
        assert prep.feature_ref is not None
        return prep.feature_ref
    assert mask_at == "input", f"settings.mask_at is {mask_at!r}"
    assert LOUD_FALLBACK.search(console_text(res)), (
        "mmdiag fell back to input masking without saying so on the console (report notes: "
        f"{notes}); console output:\n{res.output[-2000:]}")
    return prep.input_ref


def compare(report: dict, ref: Reference, what: tuple[str, ...] = ("accuracy", "unimodal", "shapley")) -> list[str]:
    problems = []
    if "accuracy" in what and abs(report["accuracy"] - ref.accuracy) > TOL:
        problems.append(f"accuracy: mmdiag {report['accuracy']:.6f} vs reference {ref.accuracy:.6f}")
    for name, expected in (("unimodal", ref.unimodal), ("shapley", ref.shapley)):
        if name not in what:
            continue
        got = report["diagnostics"].get(name, {}).get("per_modality")
        if got is None:
            problems.append(f"{name}: missing from the report")
            continue
        for m, v in expected.items():
            if m not in got or got[m] is None or abs(got[m] - v) > TOL:
                problems.append(f"{name}.{m}: mmdiag {got.get(m)} vs reference {v:.6f}")
    if "coalitions" in what:
        problems += compare_coalitions(report, ref)
    return problems


def compare_coalitions(report: dict, ref: Reference) -> list[str]:
    """Every coalition's accuracy (``shapley.details.coalition_accuracy``, keys like ``none`` and
    ``audio+visual``), where the report has them: this pins a wrong Shapley value to a subset."""
    got = report["diagnostics"].get("shapley", {}).get("details", {}).get("coalition_accuracy") or {}
    problems = []
    for key, value in got.items():
        members = frozenset() if key == "none" else frozenset(key.split("+"))
        if members in ref.coalitions and abs(value - ref.coalitions[members]) > TOL:
            problems.append(f"coalition {key}: mmdiag {value:.6f} vs reference {ref.coalitions[members]:.6f}")
    return problems


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_exact(zoo, tmp_path: Path, name: str) -> None:
    prep = zoo(name)
    case = prep.case
    assert prep.input_ref.near_ties == 0 and (prep.feature_ref is None or prep.feature_ref.near_ties == 0), (
        "the reference has near-tied logits: the case's data or weights make it a poor oracle")
    primary = prep.feature_ref or prep.input_ref  # the case must have something to measure
    spread = max(primary.unimodal.values()) - min(primary.unimodal.values())
    assert primary.accuracy > 1 / case.n_classes + 0.2 and spread > 0.05, (primary.accuracy, primary.unimodal)
    res, report = analyze(prep, tmp_path / "fast", FAST)
    report = check_ran(res, report)
    ref = expected_reference(case, prep, res, report)
    problems = compare(report, ref, ("accuracy", "unimodal", "shapley", "coalitions"))
    if problems:
        other = prep.input_ref if ref is prep.feature_ref else prep.feature_ref
        hint = ""
        if other is not None and not compare(report, other):
            hint = " (mmdiag's numbers match the OTHER masking level's reference)"
        pytest.fail(
            f"[{case.name}: {case.notes}] mask_at={report['settings'].get('mask_at')}{hint}\n  "
            + "\n  ".join(problems) + f"\n  notes: {report['settings'].get('adapter', {}).get('notes')}")


@pytest.mark.slow  # about 3 s a model, mostly the plots of the full report
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_full_suite_has_no_errors(zoo, tmp_path: Path, name: str) -> None:
    prep = zoo(name)
    res, report = analyze(prep, tmp_path / "full", FULL)
    report = check_ran(res, report)
    ref = expected_reference(prep.case, prep, res, report)
    problems = compare(report, ref, ("accuracy",))
    assert not problems, problems


def test_inplace_premise_capture_sees_the_sum() -> None:
    """Why the in-place cases are hard: a forward hook on WideDeep's ``wide`` gets the very tensor
    that ``out.add_(deep)`` then changes, so a capture that keeps it without a copy holds the fused
    logits, not the wide component's."""
    from . import zoo_models

    torch.manual_seed(0)
    model = zoo_models.build_widedeep().eval()
    x = {"wide": torch.randn(4, 10), "deep": torch.randn(4, 10)}
    seen = {}

    def hook(_mod, _inp, out):
        seen.setdefault("wide", out)  # returns None: the output is not replaced

    handle = model.wide.register_forward_hook(hook)
    with torch.no_grad():
        fused = model(x)
        wide_alone = model.wide(x["wide"])
    handle.remove()
    assert torch.equal(seen["wide"], fused) and not torch.allclose(seen["wide"], wide_alone)


def test_reference_self_check(zoo) -> None:
    """The oracle agrees with the WideDeep components evaluated by hand: with ``deep`` absent the
    logits are ``wide(x)``, with ``wide`` absent ``deep(z)``, with both absent zeros (class 0)."""
    from .cases import load_own

    prep = zoo("inplace_widedeep")
    model = load_own(prep.case, prep.checkpoint)
    arrays = np.load(prep.data)
    x, z, y = (torch.from_numpy(arrays[k]) for k in ("wide", "deep", "label"))
    with torch.no_grad():
        by_hand = {
            frozenset({"wide"}): model.wide(x), frozenset({"deep"}): model.deep(z),
            frozenset(): torch.zeros(len(y), 3), frozenset({"wide", "deep"}): model.wide(x) + model.deep(z),
        }
    ref = prep.feature_ref
    for coalition, logits in by_hand.items():
        assert ref.coalitions[coalition] == pytest.approx(float((logits.argmax(-1) == y).double().mean()), abs=1e-12)
    assert sum(ref.shapley.values()) == pytest.approx(ref.accuracy - ref.coalitions[frozenset()], abs=1e-12)


@pytest.mark.slow  # importing lightning and fitting: about 4 s
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # lightning's own use of a deprecated torch pytree API
def test_lightning_trainer_checkpoint(tmp_path: Path) -> None:
    """A checkpoint written by a real ``lightning.Trainer`` (``self.model`` inside a LightningModule)."""
    L = pytest.importorskip("lightning", reason="lightning is not installed; the Trainer-written .ckpt case needs it")
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from .cases import MODELS_FILE, N_TEST, N_TRAIN, load_own, make_data, references

    case = CASES_BY_NAME["lightning_layout"]
    full = make_data(case.data, N_TRAIN + N_TEST, case.n_classes, 0)
    train = {k: v[:N_TRAIN] for k, v in full.items()}
    test = {k: v[N_TRAIN:] for k, v in full.items()}

    class Module(L.LightningModule):
        def __init__(self, lr: float = 1e-2) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = case.build()

        def training_step(self, batch, _idx):
            a, v, y = batch
            return F.cross_entropy(self.model(a, v), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(*(torch.from_numpy(train[k]) for k in ("audio", "visual", "label"))),
                        batch_size=64, shuffle=True)
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Module(), loader)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    data = tmp_path / "test.npz"
    np.savez(data, **test)
    feat, inp = references(case, load_own(case, ckpt), test)
    prep = Prepared(case, f"{MODELS_FILE}:{case.factory}", ckpt, data, feat, inp)
    res, report = analyze(prep, tmp_path / "out", FAST)
    report = check_ran(res, report)
    problems = compare(report, expected_reference(case, prep, res, report))
    assert not problems, problems
