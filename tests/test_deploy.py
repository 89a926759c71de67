"""mmdiag.deploy: saving and loading the restore fix's translator, with_restoration against a hand
computation, restored subsets through the adapter (analyze(restore=...) and `analyze --restore`), and
rebalance writing restore.safetensors beside the model."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmdiag
from mmdiag.adapter import ModelAdapter
from mmdiag.deploy import (RESTORE_META, RESTORE_WEIGHTS, RestoredModel, attach_restoration, load_restoration,
                           save_restoration, with_restoration)
from mmdiag.errors import ConfigError, LoadError
from mmdiag.evidence import mask_of
from mmdiag.fixes.restore import Restore, Translator
from mmdiag.loading import save_state_dict
from tests.helpers.cli_run import run as cli
from tests.helpers.fixkit import MODS, tensors, train
from tests.helpers.toys import DOMINANT, toy_split


@functools.lru_cache(maxsize=None)
def _trained():
    run = train(Restore(), epochs=3)
    run.model.eval()
    return run.model, run.ctx.aux["restore"].eval()


@pytest.fixture()
def trained():
    return _trained()


@pytest.fixture()
def saved(trained, tmp_path: Path) -> Path:
    save_restoration(trained[1], tmp_path / "run")
    return tmp_path / "run"


def held_out() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    xs, y = tensors(toy_split(DOMINANT, 0)[1])
    return {m: x[:50] for m, x in xs.items()}, y[:50]


@torch.no_grad()
def by_hand(model, tr: Translator, xs: dict[str, torch.Tensor], missing: str) -> torch.Tensor:
    """Logits with ``missing`` restored: the present encoder, T_missing's MLP from its weights, the head."""
    other = [m for m in MODS if m != missing][0]
    h = model.encoders[other](xs[other])
    b = tr.branches[missing]
    est = F.relu(torch.cat([h, torch.ones(len(h), 1)], 1) @ b.w1.T + b.b1) @ b.w2.T + b.b2
    feats = {missing: est, other: h}
    return model.head(torch.cat([feats["audio"], feats["visual"]], 1))


def test_save_and_load_round_trip(trained, saved: Path) -> None:
    model, tr = trained
    assert (saved / RESTORE_WEIGHTS).is_file() and (saved / RESTORE_META).is_file()
    meta = json.loads((saved / RESTORE_META).read_text())
    assert meta["modalities"] == list(MODS) and meta["shapes"] == {"audio": [16], "visual": [16]}
    assert meta["hidden"] == 256 and "Linear" in meta["architecture"]
    assert meta["inputs"]["audio"] == {"shape": [8], "dtype": "float32"}
    loaded = load_restoration(saved)
    assert not loaded.training and loaded.describe() == tr.describe()
    for k, v in tr.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    xs, _ = held_out()
    feats = {m: model.encoders[m](xs[m]).detach() for m in MODS}
    with torch.no_grad():
        assert torch.equal(loaded.restore(feats, ["visual"])["audio"], tr.restore(feats, ["visual"])["audio"])
    assert load_restoration(saved / RESTORE_WEIGHTS).describe() == tr.describe()  # the file itself works too


def test_load_errors_say_what_was_expected(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(LoadError, match=f"expected {RESTORE_WEIGHTS} and {RESTORE_META}.*no such folder"):
        load_restoration(tmp_path / "nowhere")
    meta = json.loads((saved / RESTORE_META).read_text())
    (saved / RESTORE_META).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(LoadError, match="format 99"):
        load_restoration(saved)


def test_with_restoration_equals_the_hand_computation(trained) -> None:
    model, tr = trained
    net = with_restoration(model, tr)
    assert isinstance(net, RestoredModel) and net.modalities == MODS
    xs, _ = held_out()
    with torch.no_grad():
        for missing in MODS:
            other = [m for m in MODS if m != missing][0]
            want = by_hand(model, tr, xs, missing)
            torch.testing.assert_close(net({other: xs[other]}), want)
            torch.testing.assert_close(net({other: xs[other], missing: None}), want)  # None = absent
        torch.testing.assert_close(net(xs), model(xs))  # nothing missing: the model itself
    with pytest.raises(ConfigError, match="Every modality is missing"):
        net({"audio": None})
    with pytest.raises(ConfigError, match="Unknown modality 'depth'"):
        net({"depth": xs["audio"]})


def test_with_restoration_from_a_folder(trained, saved: Path) -> None:
    model, tr = trained
    xs, _ = held_out()
    with torch.no_grad():
        torch.testing.assert_close(with_restoration(model, saved)({"visual": xs["visual"]}),
                                   by_hand(model, tr, xs, "audio"))


def test_adapter_subset_logits_use_the_translator(trained) -> None:
    model, tr = trained
    adapter = ModelAdapter(model, MODS)
    facts = attach_restoration(adapter, tr)
    assert facts["modalities"] == list(MODS) and "restored" in facts["note"]
    xs, _ = held_out()
    with torch.no_grad():
        torch.testing.assert_close(adapter.subset_logits(xs, ["visual"]), by_hand(model, tr, xs, "audio"))
        torch.testing.assert_close(adapter.subset_logits(xs, ["audio"]), by_hand(model, tr, xs, "visual"))
        zeros = model.head(torch.zeros(50, 32))  # the empty subset stays masked
        torch.testing.assert_close(adapter.subset_logits(xs, []), zeros)
    with pytest.raises(ConfigError, match="feature-level masking"):
        attach_restoration(ModelAdapter(model, MODS, mask_at="input"), tr)


def test_analyze_evaluates_subsets_with_restoration(trained, saved: Path) -> None:
    model, tr = trained
    data = {k: v[:50] for k, v in toy_split(DOMINANT, 0)[1].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report, ev = mmdiag.analyze(model, data, only=["combinations"], bootstrap=0, restore=saved,
                                    return_evidence=True)
        plain = mmdiag.analyze(model, data, only=["combinations"], bootstrap=0)
    xs, _ = held_out()
    got = ev.subsets[mask_of(["visual"], MODS)]  # rows in the evidence's (shuffled) order: ev.index
    torch.testing.assert_close(got, by_hand(model, tr, xs, "audio")[ev.index].float())
    assert report.settings["restore"]["from"] == str(saved)
    acc = report.diagnostics["combinations"].details["accuracy"]
    assert acc["visual"] != plain.diagnostics["combinations"].details["accuracy"]["visual"]


def test_cli_analyze_restore(trained, saved: Path, tmp_path: Path) -> None:
    model, _ = trained
    (tmp_path / "net.py").write_text("from mmdiag.examples_data.synthetic import ToyNet\n\n"
                                     "def build():\n    return ToyNet(['audio', 'visual'])\n")
    save_state_dict(model.state_dict(), tmp_path / "model.safetensors")
    np.savez(tmp_path / "test.npz", **{k: v[:50] for k, v in toy_split(DOMINANT, 0)[1].items()})
    res = cli(["analyze", "--model", f"{tmp_path}/net.py:build", "--checkpoint", tmp_path / "model.safetensors",
               "--data", tmp_path / "test.npz", "--only", "combinations", "--bootstrap", "0", "--device", "cpu",
               "--restore", saved, "--out", tmp_path / "out"])
    assert res.exit_code == 0, res.output
    assert "restoring missing modalities" in " ".join(res.output.split())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["restore"]["modalities"] == list(MODS)


def test_rebalance_writes_the_translator_beside_the_model(tmp_path: Path) -> None:
    from mmdiag.examples_data.synthetic import ToyNet
    from mmdiag.rebalance import rebalance
    from mmdiag.specs import AnalysisSpec, TrainSpec

    train_data, val = toy_split(DOMINANT, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rebalance(lambda: ToyNet(list(MODS)), {k: v[:128] for k, v in train_data.items()},
                           val_data={k: v[:64] for k, v in val.items()}, fix="restore",
                           train=TrainSpec(epochs=1, batch_size=64, device="cpu"),
                           analysis=AnalysisSpec(only=("combinations",), bootstrap=0), out_dir=tmp_path / "rb")
    assert (tmp_path / "rb" / "model.safetensors").is_file()
    loaded = load_restoration(tmp_path / "rb")
    assert loaded.describe() == result.history.aux["restore"].describe()
    xs, _ = held_out()
    with torch.no_grad():
        assert with_restoration(result.model, loaded)({"visual": xs["visual"]}).shape == (50, 4)
    # the after model is analysed as it is deployed: absent modalities restored, not masked
    assert result.after.settings["restore"]["modalities"] == list(MODS)
    assert "restore" not in (result.baseline.settings if result.baseline is not None else {})
    assert any("translator restoring the absent modalities" in n for n in result.notes)
    adapter = ModelAdapter(result.model, MODS)
    attach_restoration(adapter, loaded)
    vx = {m: torch.as_tensor(np.asarray(val[m][:64]), dtype=torch.float32) for m in MODS}
    labels = torch.as_tensor(np.asarray(val["label"][:64]))
    result.model.eval()
    with torch.no_grad():  # accuracy with audio absent, restored from visual: as the report says
        restored = (adapter.subset_logits(vx, ["visual"]).argmax(1) == labels).float().mean()
    assert result.after.diagnostics["combinations"].per_modality["audio"] == pytest.approx(float(restored))
