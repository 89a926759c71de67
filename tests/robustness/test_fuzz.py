"""Fuzzing with hypothesis: any exception other than mmdiag's own error types is a bug."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings, strategies as st

from mmdiag.cli import config as cfg
from mmdiag.errors import MmdiagError
from mmdiag.loading import load_dataset
from mmdiag.report import Failure, Report, Result, Verdict

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

keys = st.sampled_from(["bootstrap", "seed", "only", "mask", "bootstrapp", "gate", "params", "model-kwargs",
                        "batch_size", "out", "x", "thresholds"])
values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                      max_leaves=6)


class FakeCtx:
    def get_parameter_source(self, name):
        return None


@FUZZ
@given(st.dictionaries(keys, values, max_size=5))
def test_config_resolution_raises_only_mmdiag_errors(conf):
    defaults = {"bootstrap": 1000, "seed": 0, "only": None, "mask": "zero", "batch_size": 256, "out": "o"}
    try:
        merged = cfg.resolve(FakeCtx(), defaults, conf, "fuzz.toml", defaults)
        for table in ("params", "thresholds", "gate", "model_kwargs"):
            cfg.table(conf, table)
    except MmdiagError:
        return
    assert set(merged) == set(defaults)


@FUZZ
@given(st.text(max_size=200))
def test_toml_text_raises_only_mmdiag_errors(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mmdiag.toml"
        path.write_text(text)
        try:
            cfg.find_config(path)
        except MmdiagError:
            pass


dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.bool_, np.uint8, np.float16])
shapes = st.lists(st.integers(0, 4), min_size=1, max_size=3)


@st.composite
def npz_contents(draw):
    n = draw(st.integers(0, 6))
    out = {}
    for name in draw(st.lists(st.sampled_from(["audio", "visual", "label", "labels", "ood", "index", "text"]),
                              max_size=5, unique=True)):
        shape = draw(shapes)
        if draw(st.booleans()):
            shape = [n] + shape[1:]
        dtype = draw(dtypes)
        arr = np.asarray(np.random.default_rng(draw(st.integers(0, 99))).normal(size=shape) * 3).astype(dtype)
        if draw(st.booleans()) and arr.size and np.issubdtype(arr.dtype, np.floating):
            arr.flat[0] = np.nan
        out[name] = arr
    return out


@FUZZ
@given(npz_contents())
def test_npz_loader_raises_only_mmdiag_errors(contents):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.npz"
        np.savez(path, **contents)
        try:
            ds, mods = load_dataset(str(path))
        except MmdiagError:
            return
        assert len(mods) >= 2
        for i in range(min(len(ds), 2)):
            item = ds[i]
            assert set(mods) <= set(item)


floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@FUZZ
@given(mods=st.lists(st.text("abcdefgh", min_size=1, max_size=5), min_size=2, max_size=4, unique=True),
       vals=st.lists(floats, min_size=4, max_size=4), sev=st.sampled_from(["none", "mild", "strong"]))
def test_report_json_round_trip(mods, vals, sev):
    res = Result(name="shapley", value=vals[0], per_modality={m: vals[i % 4] for i, m in enumerate(mods)},
                 ci={m: [vals[1], vals[2]] for m in mods}, details={"nested": {"x": [vals[3]]}})
    report = Report(modalities=mods, n_samples=3, accuracy=vals[1], settings={"seed": 0},
                    diagnostics={"shapley": res}, failures=[Failure("mdi", "boom")],
                    verdict=Verdict(mods[0], mods[1:], sev, "ogm_ge", ["because"]))
    text = report.to_json()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    back = Report.from_dict(json.loads(text))
    assert back.to_dict() == json.loads(text)


REQUIRED = {"schema_version": 1, "modalities": ["a", "b"], "n_samples": 2, "accuracy": 0.5, "diagnostics": {},
            "verdict": {"dominant": None, "underused": [], "severity": "none", "recommended_fix": None, "reasons": []}}


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(REQUIRED) + ["failures", "settings"]), values, max_size=4))
@example({"n_samples": float("inf")})  # int(inf) raises OverflowError, found by this test once
@example({"schema_version": float("-inf")})
def test_malformed_report_documents_raise_mmdiag_errors(overrides):
    doc = {**REQUIRED, **overrides}
    try:
        Report.from_dict(doc)
    except MmdiagError:
        pass
