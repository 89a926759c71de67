"""The spec objects: one definition of the shared settings, the same results as the keyword forms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mmdiag
from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings
from mmdiag.errors import ConfigError
from mmdiag.examples_data.synthetic import ToyNet
from mmdiag.fixes import FIXES
from mmdiag.rebalance import DEFAULT_TRAINING
from mmdiag.specs import AdapterSpec, AnalysisSpec, TrainSpec
from mmdiag.train import fit
from tests.helpers.toys import DOMINANT, toy_split, trained_toy

MODS = ("audio", "visual")


def test_train_spec_checks_and_normalises_its_values() -> None:
    spec = TrainSpec(epochs="3", lr=1, batch_size=32.0, grad_clip=1)  # type: ignore[arg-type]
    assert (spec.epochs, spec.lr, spec.batch_size, spec.grad_clip) == (3, 1.0, 32, 1.0)
    assert isinstance(spec.lr, float) and isinstance(spec.epochs, int)
    for bad, match in (({"optimizer": "rmsprop"}, "optimizer"), ({"lr": 0}, "lr"), ({"epochs": -1}, "epochs"),
                       ({"batch_size": 0}, "batch_size"), ({"weight_decay": -1}, "weight_decay"),
                       ({"grad_clip": 0}, "grad_clip")):
        with pytest.raises(ConfigError, match=match):
            TrainSpec(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.lr = 2.0  # type: ignore[misc]
    assert spec.replace(lr=0.5).lr == 0.5 and spec.lr == 1.0
    with pytest.raises(TypeError, match="no field 'learning_rate'"):
        spec.replace(learning_rate=0.5)


def test_rebalance_keeps_the_command_lines_training_defaults() -> None:
    assert (DEFAULT_TRAINING.epochs, DEFAULT_TRAINING.lr, DEFAULT_TRAINING.weight_decay) == (20, 1e-2, 1e-4)
    assert (TrainSpec().epochs, TrainSpec().lr, TrainSpec().weight_decay) == (10, 1e-3, 0.0)  # fit's own


def test_fit_with_a_spec_equals_fit_with_keywords() -> None:
    train, val = toy_split(DOMINANT, 0)
    states, rows = [], []
    for use_spec in (True, False):
        torch.manual_seed(0)
        model = ToyNet(list(MODS))
        adapter = ModelAdapter(model, MODS)
        settings = dict(epochs=2, optimizer="adam", lr=0.01, batch_size=64, seed=3, device="cpu")
        if use_spec:
            hist = fit(adapter, train, TrainSpec(**settings), val_data=val, fix=FIXES.get("ogm_ge")())
        else:
            hist = fit(adapter, train, val_data=val, fix=FIXES.get("ogm_ge")(), **settings)
        states.append(model.state_dict())
        rows.append([{k: v for k, v in r.items() if k != "time_s"} for r in hist.rows])
    assert rows[0] == rows[1]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    with pytest.raises(TypeError, match="no field 'epoch'"):
        fit(ModelAdapter(ToyNet(list(MODS)), MODS), train, epoch=1)


def test_adapter_spec_builds_the_adapter() -> None:
    spec = AdapterSpec(encoders={"audio": "encoders.audio", "visual": "encoders.visual"}, mask="mean")
    assert spec.modalities is None
    with pytest.raises(ConfigError, match="`modalities=\\[a, b\\]`"):
        spec.build(ToyNet(list(MODS)))
    adapter = spec.with_modalities(["audio", "visual"]).build(ToyNet(list(MODS)), seed=4)
    assert adapter.modalities == MODS and adapter.mask == "mean" and adapter.seed == 4
    assert adapter.encoders == {"audio": "encoders.audio", "visual": "encoders.visual"}
    assert AdapterSpec(encoders={}).encoders is None  # an empty table: found by name


def test_analysis_spec_checks_bootstrap_and_seed_and_seeds_the_collection() -> None:
    with pytest.raises(ConfigError, match="bootstrap"):
        AnalysisSpec(bootstrap=-1)
    with pytest.raises(ConfigError, match="seed"):
        AnalysisSpec(seed=-2)
    spec = AnalysisSpec(only=["unimodal"], seed=5, collect=CollectSettings(batch_size=17, seed=99))
    assert spec.only == ("unimodal",)
    assert spec.collect_settings().seed == 5 and spec.collect_settings(seed_offset=1).seed == 6
    assert spec.collect_settings().batch_size == 17


def test_analyze_with_specs_equals_analyze_with_keywords() -> None:
    _, val = toy_split(DOMINANT, 0)
    model = trained_toy(DOMINANT, 0)
    fast = CollectSettings(device="cpu", batch_size=100)
    by_keywords = mmdiag.analyze(model, val, modalities=MODS, only=["unimodal", "shapley"], bootstrap=50, seed=2,
                                 collect_settings=fast, mask="mean")
    by_specs = mmdiag.analyze_with(model, val, AdapterSpec(modalities=MODS, mask="mean"),
                                   AnalysisSpec(only=("unimodal", "shapley"), bootstrap=50, seed=2, collect=fast))
    a, b = by_keywords.to_dict(), by_specs.to_dict()
    for doc in (a, b):
        doc.pop("created", None)
    assert a == b
