"""ood: prototype-distance scores of new data per modality, the share beyond the reference quantile,
AUROC against known flags, the drift line of the verdict, unlabelled new data and the CLI flags."""

from __future__ import annotations

import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mmdiag
from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.diagnostics._probes import auroc
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.examples_data.synthetic import make_toy
from mmdiag.gate import evaluate
from mmdiag.loading.ood import load_new_data
from tests.helpers.cli_run import run

Ood = DIAGNOSTICS.get("ood")
MODS = ("audio", "visual")


# ------------------------------------------------------------------------------------ known answer, by hand

def hand_evidence(new_audio: np.ndarray, new_visual: np.ndarray, flags: dict | None = None) -> Evidence:
    """Reference features on the axes: class 0 along e0, class 1 along e1 (both modalities), 10 rows each."""
    g = np.random.default_rng(0)
    labels = np.repeat([0, 1], 10)
    ref = np.where(labels[:, None] == 0, [1.0, 0.0], [0.0, 1.0]) + 0.05 * g.normal(size=(20, 2))
    feats = {m: torch.tensor(ref, dtype=torch.float32) for m in MODS}
    new = {"audio": torch.tensor(new_audio, dtype=torch.float32), "visual": torch.tensor(new_visual, dtype=torch.float32)}
    return Evidence(modalities=MODS, n_classes=2, labels=torch.tensor(labels), logits=torch.zeros(20, 2),
                    index=torch.arange(20), features=feats, feature_rows=torch.arange(20),
                    ood_features=new, ood_rows=torch.arange(len(new_audio)), ood_flags=flags)


def test_scores_threshold_and_shares_by_hand():
    on_axis = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    diagonal = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0], [-1.0, 0.0]])
    ev = hand_evidence(on_axis, diagonal)
    res = Ood(bootstrap=0, center=False).compute(ev)
    # uncentred: the prototypes are (about) e0 and e1; on-axis rows score about 0, the diagonal
    # 1 - 1/sqrt(2), and (-1, 0) about 1 (its best cosine is about 0)
    cols = {k: np.asarray(v) for k, v in res.per_sample.items()}
    assert cols["score_audio"] == pytest.approx([0, 0, 0, 0], abs=0.01)
    assert cols["score_visual"] == pytest.approx([1 - 2 ** -0.5, 1 - 2 ** -0.5, 0, 1], abs=0.02)
    # the threshold: the 0.95-quantile of the reference rows' own scores, prototypes by hand
    x = np.asarray(ev.features["audio"], dtype=np.float64)
    protos = np.stack([x[:10].mean(0), x[10:].mean(0)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    ref_scores = 1 - (x / np.linalg.norm(x, axis=1, keepdims=True) @ protos.T).max(axis=1)
    assert res.details["threshold"]["audio"] == pytest.approx(np.quantile(ref_scores, 0.95))
    shares = {m: float(np.mean(cols[f"score_{m}"] > res.details["threshold"][m])) for m in MODS}
    assert res.per_modality == pytest.approx(shares) and res.per_modality["visual"] == 0.75
    assert res.value == 0.75 and res.details["most_shifted"] == "visual"
    assert cols["row"].tolist() == [0, 1, 2, 3] and cols["beyond_visual"].tolist() == [1, 1, 0, 1]
    assert res.details["flags"].startswith("none")  # no flags: no AUROC


def test_auroc_with_flags_and_the_reference_as_negatives():
    far = np.array([[1.0, 1.0]] * 3 + [[1.0, 0.0]] * 3)
    flags = {"visual": torch.tensor([True, True, True, False, False, False])}
    res = Ood(bootstrap=0, center=False).compute(hand_evidence(far, far, flags))
    assert set(res.details["auroc"]) == {"visual"} and res.details["auroc"]["visual"] == 1.0
    assert res.details["fpr"]["visual"] == 0.0 and res.details["tpr"]["visual"] == 1.0
    every = {"visual": torch.ones(6, dtype=torch.bool)}  # no unflagged new row: the reference rows are negative
    res = Ood(bootstrap=0, center=False).compute(hand_evidence(far, far, every))
    assert res.details["auroc_negatives"]["visual"] == "reference data" and res.details["fpr"]["visual"] is None


def test_auroc_counts_ties_one_half():
    assert auroc(np.array([1.0, 1.0, 0.0, 2.0]), np.array([True, False, False, True])) == pytest.approx(0.875)


def test_without_new_data_it_refuses():
    ev = hand_evidence(np.zeros((2, 2)), np.zeros((2, 2))).replace(ood_features=None)
    with pytest.raises(EvidenceError, match="ood_data"):
        Ood(bootstrap=0).compute(ev)
    with pytest.raises(ConfigError, match="quantile"):
        Ood(quantile=1.5)


# ------------------------------------------------------------------------- through analyze on a toy model


class IdentityNet(nn.Module):
    """Encoders that pass their 8 inputs through (so a shift of the input is a shift of the feature)
    and a linear head: the toy of the known-answer test."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Linear(8, 8) for m in MODS})
        for enc in self.encoders.values():
            nn.init.eye_(enc.weight)
            nn.init.zeros_(enc.bias)
        self.head = nn.Linear(16, 4)

    def forward(self, inputs):
        return self.head(torch.cat([self.encoders[m](inputs[m]) for m in MODS], dim=1))


def shifted(seed: int = 0) -> tuple[dict, dict, np.ndarray]:
    """(reference, unlabelled new data with visual shifted in half of its rows, the flags).

    The shift is large and orthogonal to visual's class means, so it points away from every prototype."""
    data = make_toy(n=1200, strength=(1.6, 1.6), seed=seed)
    ref = {k: v[:600] for k, v in data.items()}
    new = {k: v[600:].copy() for k, v in data.items() if k != "label"}
    means = np.stack([ref["visual"][ref["label"] == c].mean(axis=0) for c in range(4)])
    q, _ = np.linalg.qr(np.c_[means.T, np.random.default_rng(seed).normal(size=(8, 1))])
    direction = q[:, -1]  # orthogonal to the four class means
    flags = np.arange(600) % 2 == 1
    new["visual"][flags] += (12.0 * direction).astype(np.float32)
    return ref, new, flags


@pytest.fixture(scope="module")
def toy_result():
    torch.manual_seed(0)
    ref, new, flags = shifted()
    new["is_ood"] = flags.astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = mmdiag.analyze(IdentityNet(), ref, only=["shapley"], ood_data=new, bootstrap=200)
    return report, flags


def test_the_shifted_modality_is_found(toy_result):
    report, flags = toy_result
    res = report.diagnostics["ood"]
    assert res.details["auroc"]["visual"] > 0.95  # the shifted modality
    assert abs(res.details["auroc"]["audio"] - 0.5) < 0.1  # untouched: flags say nothing about audio
    # on the unshifted rows, about 1 - q of the samples lie beyond the threshold (the false-positive rate)
    assert abs(res.details["fpr"]["visual"] - 0.05) < 0.035 and abs(res.per_modality["audio"] - 0.05) < 0.035
    assert res.per_modality["visual"] > 0.45 and res.details["most_shifted"] == "visual"
    lo, hi = res.ci["visual"]
    assert lo <= res.per_modality["visual"] <= hi
    assert res.details["n_new"] == 600 and len(res.per_sample["row"]) == 600  # every row, not a subsample
    assert any(r.startswith("ood: visual drifted") for r in report.verdict.reasons)
    assert evaluate(report, ["ood.visual <= 0.2"]).outcomes[0].status == "FAIL"
    assert evaluate(report, ["ood.audio <= 0.2"]).outcomes[0].status == "PASS"


def test_per_modality_flags_and_labelled_new_data():
    ref, new, flags = shifted(1)
    new["is_ood_visual"] = flags
    new["label"] = np.zeros(600, dtype=np.int64)  # one class: fine, the labels are not read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mmdiag.analyze(IdentityNet(), ref, only=["shapley"], ood_data=new, bootstrap=0).diagnostics["ood"]
    assert set(res.details["auroc"]) == {"visual"} and res.details["auroc"]["visual"] > 0.95


def test_new_data_checks():
    ref, new, _ = shifted()
    with pytest.raises(ConfigError, match="is_ood_visual"):
        load_new_data({**new, "is_ood_visul": np.zeros(600)}, MODS)
    with pytest.raises(EvidenceError, match="0/1 flag"):
        load_new_data({**new, "is_ood": np.full(600, 2)}, MODS)
    with pytest.raises(ConfigError, match="no modality 'visual'"):
        load_new_data({"audio": new["audio"]}, MODS)
    with pytest.raises(ConfigError, match="ood_data"):
        mmdiag.analyze(IdentityNet(), ref, only=["ood"], bootstrap=0)


# ------------------------------------------------------------------------------------------ command line

def test_cli_ood_data_per_sample_and_gate(tmp_path):
    ref, new, flags = shifted()
    np.savez(tmp_path / "ref.npz", **ref)
    np.savez(tmp_path / "new.npz", **new, is_ood=flags)
    (tmp_path / "models.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class IdentityNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.encoders = nn.ModuleDict({m: nn.Linear(8, 8) for m in ("audio", "visual")})
                for enc in self.encoders.values():
                    nn.init.eye_(enc.weight)
                    nn.init.zeros_(enc.bias)
                self.head = nn.Linear(16, 4)

            def forward(self, inputs):
                return self.head(torch.cat([self.encoders[m](inputs[m]) for m in ("audio", "visual")], dim=1))

        def build():
            torch.manual_seed(0)
            return IdentityNet()
    '''))
    out = tmp_path / "r"
    res = run(["analyze", "--model", f"{tmp_path}/models.py:build", "--data", f"{tmp_path}/ref.npz",
               "--ood-data", f"{tmp_path}/new.npz", "--ood-quantile", "0.9", "--only", "shapley",
               "--bootstrap", "50", "--per-sample", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ood = json.loads((out / "report.json").read_text())["diagnostics"]["ood"]
    assert ood["params"]["quantile"] == 0.9 and ood["details"]["auroc"]["visual"] > 0.95
    header = (out / "per_sample.csv").read_text().splitlines()[0].split(",")
    assert {"ood.row", "ood.score_visual", "ood.beyond_audio"} <= set(header)
    gate = run(["gate", str(out / "report.json"), "--rule", "ood.audio <= 0.25", "--rule", "ood.visual <= 0.25"])
    assert gate.exit_code == 1 and "FAIL" in gate.output
    missing = run(["analyze", "--model", f"{tmp_path}/models.py:build", "--data", f"{tmp_path}/ref.npz",
                   "--ood-data", f"{tmp_path}/nothere.npz", "--device", "cpu", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "nothere.npz" in missing.output
