"""The bad-input matrix: every case exits 2 with a one-paragraph message that names the file,
the problem and the fix, prints no traceback, and leaves nothing in --out."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmdiag.cli.app import app

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, classes=3):
            super().__init__()
            self.audio_net = nn.Linear(4, 6)
            self.visual_net = nn.Linear(5, 6)
            self.head = nn.Linear(12, classes)
        def forward(self, audio, visual):
            return self.head(torch.cat([self.audio_net(audio), self.visual_net(visual)], 1))

    class Flat(Net):
        def forward(self, audio, visual):
            return super().forward(audio, visual)[:, None]  # [B, 1, C]: no class axis to read

    class NanOut(Net):
        def forward(self, audio, visual):
            return super().forward(audio, visual) * float("nan")

    def build(classes=3):
        return Net(classes)

    def flat():
        return Flat()

    def nan_out():
        return NanOut()

    def broken():
        raise RuntimeError("cannot build without the pretrained backbone")

    def not_a_module():
        return 42
''')


def good_arrays(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return {"audio": rng.normal(size=(n, 4)).astype(np.float32), "visual": rng.normal(size=(n, 5)).astype(np.float32),
            "label": rng.integers(0, 3, size=n)}


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    np.savez(tmp_path / "good.npz", **good_arrays())
    torch.manual_seed(0)
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("robust_net", tmp_path / "net.py")
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.build().state_dict(), tmp_path / "good.pt")
    return tmp_path


def npz(ws, name, **arrays):
    np.savez(ws / name, **arrays)
    return str(ws / name)


def case_missing_file(ws):
    return ["--data", str(ws / "nothere.npz")], ["nothere.npz"]


def case_truncated_checkpoint(ws):
    data = (ws / "good.pt").read_bytes()
    (ws / "cut.pt").write_bytes(data[: len(data) // 2])
    return ["--checkpoint", str(ws / "cut.pt")], ["cut.pt", "truncated or corrupted"]


def case_random_bytes_checkpoint(ws):
    (ws / "noise.pt").write_bytes(os.urandom(2000))
    return ["--checkpoint", str(ws / "noise.pt")], ["noise.pt"]


def case_state_dict_mismatch(ws):
    sd = torch.load(ws / "good.pt", weights_only=True)
    sd["head.weight"] = torch.zeros(7, 12)
    sd["extra.bias"] = torch.zeros(2)
    del sd["audio_net.bias"]
    torch.save(sd, ws / "bad.pt")
    return ["--checkpoint", str(ws / "bad.pt")], ["audio_net.bias", "extra.bias", "head.weight", "--model"]


def case_factory_module_missing(ws):
    return ["--model", "no_such_pkg.models:build"], ["no_such_pkg"]


def case_factory_attribute_missing(ws):
    return ["--model", f"{ws}/net.py:biuld"], ["biuld", "build"]


def case_factory_raises(ws):
    return ["--model", f"{ws}/net.py:broken"], ["broken", "pretrained backbone"]


def case_factory_not_module(ws):
    return ["--model", f"{ws}/net.py:not_a_module"], ["int"]


def case_npz_without_labels(ws):
    a = good_arrays()
    del a["label"]
    return ["--data", npz(ws, "nolab.npz", **a)], ["nolab.npz", "label"]


def case_float_labels(ws):
    a = good_arrays()
    a["label"] = a["label"] + 0.5
    return ["--data", npz(ws, "flt.npz", **a)], ["flt.npz", "integer"]


def case_labels_out_of_range(ws):
    a = good_arrays()
    a["label"][3] = 7
    return ["--data", npz(ws, "range.npz", **a)], ["7", "classes"]


def case_unequal_counts(ws):
    a = good_arrays()
    a["visual"] = a["visual"][:20]
    return ["--data", npz(ws, "uneq.npz", **a)], ["uneq.npz", "20", "30"]


def case_unknown_modality(ws):
    return ["--modalities", "audio,vision"], ["vision", "visual"]


def case_modality_model_does_not_take(ws):
    a = good_arrays()
    a["depth"] = a["visual"]
    return ["--data", npz(ws, "three.npz", **a)], ["do not match", "--modalities"]


def case_wrong_output_shape(ws):
    return ["--model", f"{ws}/net.py:flat"], ["shape", "classes"]


def case_nan_inputs(ws):
    a = good_arrays()
    a["audio"][[1, 4], 0] = np.nan
    a["visual"][2, 1] = np.inf
    return ["--data", npz(ws, "nan.npz", **a)], ["nan.npz", "--nan-policy skip"]


def case_nan_logits(ws):
    return ["--model", f"{ws}/net.py:nan_out"], ["NaN", "logits"]


def case_empty_dataset(ws):
    a = {k: v[:0] for k, v in good_arrays().items()}
    return ["--data", npz(ws, "empty.npz", **a)], ["empty"]


def case_one_class(ws):
    a = good_arrays()
    a["label"][:] = 1
    return ["--data", npz(ws, "oneclass.npz", **a)], ["one class"]


def case_single_modality(ws):
    a = good_arrays()
    del a["visual"]
    return ["--data", npz(ws, "mono.npz", **a)], ["at least 2"]


def case_config_unknown_key(ws):
    (ws / "bad.toml").write_text("batch_sise = 3\n")
    return ["--config", str(ws / "bad.toml")], ["batch_sise", "batch_size"]


def case_bad_config_syntax(ws):
    (ws / "broken.toml").write_text("this is = = not toml\n")
    return ["--config", str(ws / "broken.toml")], ["broken.toml", "TOML"]


def case_bad_mask(ws):
    return ["--mask", "blur"], ["--mask", "zero"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.removeprefix("case_"))
def test_bad_input_exits_2_with_actionable_message(ws, case):
    extra, needles = case(ws)
    base = {"--model": f"{ws}/net.py:build", "--checkpoint": str(ws / "good.pt"), "--data": str(ws / "good.npz")}
    args = ["analyze"]
    for flag, value in base.items():
        if flag not in extra:
            args += [flag, value]
    out = ws / "out"
    args += extra + ["--out", str(out), "--bootstrap", "10", "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    text = " ".join(res.output.split())
    assert res.exit_code == 2, text
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    assert not out.exists() or not any(out.iterdir()), "something was written to --out"


def test_constant_modality_is_analyzed_not_crashed(ws):
    a = good_arrays(60)
    a["visual"][:] = 0.5
    path = npz(ws, "const.npz", **a)
    res = CliRunner().invoke(app, ["analyze", "--model", f"{ws}/net.py:build", "--data", path, "--out",
                                   str(ws / "o"), "--bootstrap", "20", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (ws / "o" / "report.json").exists()


def test_nan_policy_skip_drops_and_records(ws):
    a = good_arrays(40)
    a["audio"][[1, 4], 0] = np.nan
    path = npz(ws, "nan2.npz", **a)
    res = CliRunner().invoke(app, ["analyze", "--model", f"{ws}/net.py:build", "--data", path, "--nan-policy", "skip",
                                   "--out", str(ws / "o"), "--bootstrap", "10", "--device", "cpu",
                                   "--only", "shapley"])
    assert res.exit_code == 0, res.output
    import json

    report = json.loads((ws / "o" / "report.json").read_text())
    assert report["n_samples"] == 38
