"""ood: which modality of new data drifted from the reference data, by prototype distances (PGAN's idea)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mmdiag.diagnostics._probes import as_array, auroc
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_rows, percentile_interval
from mmdiag.validation import Spec


def unit_prototypes(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[list[int], np.ndarray]:
    """(classes present, [K', d] L2-normalised class means of ``x``); a zero mean stays zero."""
    classes = [k for k in range(n_classes) if np.any(y == k)]
    protos = np.stack([x[y == k].mean(axis=0) for k in classes])
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    return classes, np.divide(protos, norms, out=np.zeros_like(protos), where=norms > 0)


def prototype_scores(x: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """[n] s(x) = 1 - max_c cos(x, p_c) (a zero feature has cosine 0 with every prototype)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return 1.0 - (unit @ protos.T).max(axis=1)


def share_draws(ref: np.ndarray, new: np.ndarray, q: float, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, M] shares of new rows beyond the q-quantile of the reference rows, both resampled.

    Each draw resamples the reference rows (the threshold moves) and the new rows (the share moves)
    independently, so the interval carries the uncertainty of both.
    """
    out = np.empty((max(n_boot, 0), ref.shape[1]))
    pairs = zip(bootstrap_rows(ref.shape[0], n_boot, seed), bootstrap_rows(new.shape[0], n_boot, seed + 1))
    for b, (ri, ni) in enumerate(pairs):
        out[b] = (new[ni] > np.quantile(ref[ri], q, axis=0)).mean(axis=0)
    return out


def _flag_stats(new: np.ndarray, ref: np.ndarray, beyond: np.ndarray, flags: np.ndarray) -> dict[str, Any]:
    """AUROC of one modality's scores for its flags, with the false- and true-positive rates of the
    threshold; when every new row is flagged, the reference rows are the negatives."""
    if flags.all():
        scores, positive, negatives = np.concatenate([new, ref]), np.r_[flags, np.zeros(ref.shape[0], bool)], "reference data"
    else:
        scores, positive, negatives = new, flags, "new data"
    return {
        "auroc": auroc(scores, positive),
        "negatives": negatives,
        "fpr": float(beyond[~flags].mean()) if (~flags).any() else None,
        "tpr": float(beyond[flags].mean()) if flags.any() else None,
    }


@register_diagnostic
@dataclass(frozen=True)
class Ood(Diagnostic):
    """Distribution shift of new data, per modality: how far its features lie from the reference classes.

    Definition (methods.md §17.5; PGAN's abstract gives the idea, the form below is **mmdiag's
    definition**, PROPOSED). On the reference data (the evaluation data, its ``features``
    subsample; rows flagged ``ood`` left out), the prototype of class c for modality m is the mean
    pooled encoder feature of the rows of class c, L2-normalised: p_{m,c}. A sample's score is
    s_m(x) = 1 - max_c cos(f_m(x), p_{m,c}) (0 = on a prototype's direction; higher = farther).
    The threshold tau_m is the q-quantile (``quantile``, default 0.95) of s_m over the reference
    rows (the rows that built the prototypes; each weighs 1/n_c in its prototype, a small in-sample
    bias). Every row of the new data (``ood_data``, collected whole, labels not needed) is scored.

    * Per modality: the share of new samples with s_m > tau_m. In-distribution data gives about
      1 - q (``details.expected_share``); a modality that drifted gives more. Lower is better.
      Interval: bootstrap resampling both the reference rows (tau moves) and the new rows.
    * Headline: the largest per-modality share (``details.most_shifted`` names it).
    * With known flags in the new data (``is_ood`` for every modality or ``is_ood_<modality>``):
      ``details.auroc[m]``, the AUROC of s_m for telling flagged from unflagged new rows (rank form,
      ties count one half; against the reference rows when every new row is flagged), and the
      threshold's false- and true-positive rates ``details.fpr``, ``details.tpr``.
    * Per-sample columns (``per_sample.csv``): ``row`` (position in the new data), ``score_<m>``,
      ``beyond_<m>``.

    Cost: one forward pass over the new data (features only); no model call beyond it. Source:
    PGAN (prototype-guided OOD detection; abstract only, no code read): class prototypes and the
    similarity to the nearest one separate in- from out-of-distribution samples.
    """

    name = "ood"
    summary = "share of new samples beyond the reference q-quantile of each modality's distance to the class prototypes"
    needs = frozenset({"features"})
    higher_is_better = False
    default = False  # it needs new data: ``ood_data`` turns it on
    headline = "largest share"
    scale = "share of the new samples beyond the reference data's quantile"
    higher_means = "more of the new data lies farther from the reference classes in this modality (drift)"
    how_to_read = (
        "In-distribution data puts about 1 - q (5% by default) of its samples beyond the threshold; a "
        "modality well above that drifted: its sensor, preprocessing or population changed. With "
        "``is_ood`` flags, an AUROC near 1 says the modality's features notice the shift, near 0.5 that "
        "they do not."
    )
    limits = {"quantile": Spec("float", minimum=0.0, maximum=1.0, above=True,
                               hint="the reference quantile that sets each modality's threshold")}

    quantile: float = 0.95
    center: bool = True

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require("features")
        if ev.ood_features is None:
            raise EvidenceError("ood scores new data against the evaluation data, and none was given: pass it as "
                                "`ood_data` (a data file, a dict of arrays or a Dataset; labels are optional).")
        assert ev.features is not None and ev.feature_rows is not None
        rows = ev.feature_rows.numpy()
        keep = np.ones(rows.shape[0], bool) if ev.ood is None else ~ev.ood.numpy()[rows].astype(bool)
        labels = ev.labels.numpy()[rows][keep]
        if not keep.any():
            raise EvidenceError("ood needs in-distribution reference rows to build prototypes; every feature row "
                                "is flagged ood. Raise `max_feature_samples` or evaluate on in-distribution data.")
        mods = list(ev.modalities)
        ref_cols, new_cols, classes = [], [], []
        for m in mods:
            x_ref, x_new = as_array(ev.features[m])[keep], as_array(ev.ood_features[m])
            if self.center:  # the shared mean (an encoder's output bias) would dominate every cosine
                mu = x_ref.mean(axis=0, keepdims=True)
                x_ref, x_new = x_ref - mu, x_new - mu
            classes, protos = unit_prototypes(x_ref, labels, ev.n_classes)
            ref_cols.append(prototype_scores(x_ref, protos))
            new_cols.append(prototype_scores(x_new, protos))
        ref, new = np.stack(ref_cols, axis=1), np.stack(new_cols, axis=1)  # [n_r, M], [n_o, M]
        if new.shape[0] == 0:
            raise EvidenceError("The new data (`ood_data`) has no rows to score.")
        tau = np.quantile(ref, self.quantile, axis=0)
        beyond = new > tau
        shares = beyond.mean(axis=0)
        draws = share_draws(ref, new, self.quantile, self.bootstrap, self.seed)
        ci = percentile_interval(draws, self.level) if draws.shape[0] else np.full((len(mods), 2), np.nan)
        value_ci = percentile_interval(draws.max(axis=1)[:, None], self.level)[0] if draws.shape[0] else [math.nan] * 2
        details: dict[str, Any] = {
            "quantile": self.quantile,
            "expected_share": 1.0 - self.quantile,
            "threshold": {m: float(tau[j]) for j, m in enumerate(mods)},
            "most_shifted": mods[int(np.argmax(shares))],
            "any_share": float(beyond.any(axis=1).mean()),
            "mean_score_reference": {m: float(ref[:, j].mean()) for j, m in enumerate(mods)},
            "mean_score_new": {m: float(new[:, j].mean()) for j, m in enumerate(mods)},
            "n_reference": int(ref.shape[0]),
            "n_new": int(new.shape[0]),
            "classes_with_prototype": classes,
        }
        details.update(self._flags(ev, mods, new, ref, beyond))
        rows_new = ev.ood_rows.numpy() if ev.ood_rows is not None else np.arange(new.shape[0])
        per_sample: dict[str, Any] = {"row": rows_new.copy()}
        for j, m in enumerate(mods):
            per_sample[f"score_{m}"] = new[:, j].copy()
            per_sample[f"beyond_{m}"] = beyond[:, j].astype(np.int64)
        return self.result(
            float(shares.max()), {m: float(shares[j]) for j, m in enumerate(mods)},
            ci={m: [float(ci[j, 0]), float(ci[j, 1])] for j, m in enumerate(mods)},
            value_ci=[float(value_ci[0]), float(value_ci[1])], details=details, per_sample=per_sample,
        )

    @staticmethod
    def _flags(ev: Evidence, mods: list[str], new: np.ndarray, ref: np.ndarray, beyond: np.ndarray) -> dict[str, Any]:
        """AUROC, false- and true-positive rates for the modalities whose rows carry known flags."""
        flags = ev.ood_flags or {}
        if not flags:
            return {"flags": "none: the new data carries no is_ood flags"}
        stats = {m: _flag_stats(new[:, j], ref[:, j], beyond[:, j], flags[m].numpy().astype(bool))
                 for j, m in enumerate(mods) if m in flags}
        return {key: {m: s[key] for m, s in stats.items()} for key in ("auroc", "fpr", "tpr")} | {
            "auroc_negatives": {m: s["negatives"] for m, s in stats.items()},
            "n_flagged": {m: int(flags[m].numpy().astype(bool).sum()) for m in stats},
        }
