"""Evidence kinds are plug-ins: a producer module declares its kind, and collect, Evidence
(save, load, row selection, shard merge) and the diagnostics' ``needs`` pick it up."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import PRODUCERS, Batch, CollectSettings, Producer, collect, register_producer
from mmdiag.collect.sampling import pick, rows_in
from mmdiag.evidence import ENCODER_KINDS, EVIDENCE_KINDS, FIELDS, KINDS, Evidence, EvidenceKind, FieldSpec, merge_evidence
from mmdiag.loading import dataset_from_arrays
from tests.helpers.toys import DOMINANT, toy_split, trained_toy


class LogitNormProducer(Producer):
    """A kind written outside mmdiag: per-sample logit norms, and the norms of a 20-row subsample."""

    kind = EvidenceKind(
        "logit_norm", "per-sample norm of the fused logits",
        (FieldSpec("logit_norm", "sample"), FieldSpec("norm_sub", "subsample", rows="norm_rows"),
         FieldSpec("norm_rows", "rows")),
        present="logit_norm",
    )
    order = 90

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.norms: list[torch.Tensor] = []
        self.sub: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def start(self) -> None:
        self.chosen = pick(self.run.n_total, 20, 7)

    def accumulate(self, batch: Batch) -> None:
        norms = batch.logits.norm(dim=1).cpu()
        self.norms.append(norms)
        r = rows_in(batch.offset, batch.size, self.chosen, 20)
        self.sub.append(norms[r])
        self.rows.append(r + batch.offset)

    def finish(self) -> dict[str, Any]:
        return {"logit_norm": torch.cat(self.norms), "norm_sub": torch.cat(self.sub), "norm_rows": torch.cat(self.rows)}


@pytest.fixture
def plugin_kind():
    register_producer(LogitNormProducer)
    yield
    PRODUCERS.pop("logit_norm")
    KINDS.pop("logit_norm")
    EVIDENCE_KINDS.pop("logit_norm")
    for f in ("logit_norm", "norm_sub", "norm_rows"):
        FIELDS.pop(f)


def run_collect(needs, n=120):
    _, test = toy_split(DOMINANT, 0)
    test = {k: v[:n] for k, v in test.items()}
    model = trained_toy(DOMINANT, 0)
    ad = ModelAdapter(model, ("audio", "visual"))
    return collect(ad, dataset_from_arrays(test), needs, CollectSettings(device="cpu", batch_size=32))


def test_a_plugin_kind_is_collected_saved_selected_and_merged(plugin_kind, tmp_path):
    assert "logit_norm" in EVIDENCE_KINDS and "logit_norm" not in ENCODER_KINDS
    ev = run_collect({"logit_norm", "subsets"})
    assert ev.has("logit_norm")
    torch.testing.assert_close(ev.logit_norm, ev.logits.norm(dim=1))
    torch.testing.assert_close(ev.norm_sub, ev.logit_norm[ev.norm_rows])
    assert ev.meta["timings"]["logit_norm"] >= 0 and ev.meta["timings"]["forward"] > 0
    ev.save(tmp_path / "ev.pt")
    back = Evidence.load(tmp_path / "ev.pt")
    assert torch.equal(back.logit_norm, ev.logit_norm) and torch.equal(back.norm_rows, ev.norm_rows)
    # row selection keeps the subsample aligned with its row numbers
    rows = torch.arange(0, ev.n_samples, 2)
    sub = ev.select_rows(rows)
    torch.testing.assert_close(sub.norm_sub, sub.logit_norm[sub.norm_rows])
    # two shards merge back into one evidence whose subsample still points at the right rows
    a, b = ev.select_rows(torch.arange(0, 50)), ev.select_rows(torch.arange(50, ev.n_samples))
    merged = merge_evidence([a, b])
    torch.testing.assert_close(merged.logit_norm, ev.logit_norm)
    torch.testing.assert_close(merged.norm_sub, merged.logit_norm[merged.norm_rows])


def test_an_unregistered_field_is_refused_and_absent_fields_read_none():
    ev = run_collect({"subsets"})
    assert ev.features is None and not ev.has("features")
    with pytest.raises(Exception, match="unknown fields"):
        Evidence(**{**ev.to_dict(), "modalities": ev.modalities, "not_a_field": torch.zeros(1)})
    with pytest.raises(Exception, match="Unknown evidence kind"):
        ev.has("not_a_kind")


def test_every_producer_is_timed_inside_the_pass():
    ev = run_collect({"subsets", "features", "permutations", "grad_x_act"})
    timings = ev.meta["timings"]
    assert {"forward", "subsets", "features", "permutations", "grad_x_act"} <= set(timings)
    assert all(v >= 0 for v in timings.values())


def test_a_failing_producer_makes_its_kind_unavailable_not_the_pass(plugin_kind, monkeypatch):
    def boom(self, batch):
        raise RuntimeError("boom in a plug-in")

    monkeypatch.setattr(LogitNormProducer, "accumulate", boom)
    ev = run_collect({"logit_norm", "subsets"})
    assert not ev.has("logit_norm") and ev.has("subsets")
    assert "boom in a plug-in" in ev.meta["unavailable"]["logit_norm"]
