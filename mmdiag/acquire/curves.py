"""Learning curves of a simulation and their summary: area under each curve, with intervals over seeds.

A curve row is one evaluation on the validation data: ``strategy, seed, round, labels, accuracy,
unimodal.<m>..., balance``, with ``balance`` = min_m unimodal accuracy / max_m unimodal accuracy
(1 = every modality alone is as accurate as the best one; mmdiag's balance index for curves).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as sstats

#: the curves the summary reports besides each modality's: fused accuracy, the weakest modality's
#: unimodal accuracy (min over modalities at each round) and the balance index
MAIN_CURVES = ("accuracy", "weakest", "balance")


def curve_row(strategy: str, seed: int, round_: int, labels: int, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """One curves.csv row from an evaluation ``{"accuracy": a, "unimodal": {m: a_m}}``."""
    uni = dict(evaluation["unimodal"])
    best = max(uni.values())
    row: dict[str, Any] = {"strategy": strategy, "seed": int(seed), "round": int(round_), "labels": int(labels),
                           "accuracy": float(evaluation["accuracy"])}
    row.update({f"unimodal.{m}": float(v) for m, v in uni.items()})
    row["balance"] = float(min(uni.values()) / best) if best > 0 else 0.0
    return row


def curve_value(row: Mapping[str, Any], curve: str) -> float:
    """The value of ``curve`` in a row (``weakest`` = the smallest ``unimodal.*``)."""
    if curve == "weakest":
        return min(float(v) for k, v in row.items() if k.startswith("unimodal."))
    return float(row[curve])


def area(labels: Sequence[float], values: Sequence[float]) -> float:
    """Normalised area under a curve: trapezoid rule over the label counts divided by their range,
    i.e. the curve's mean height over the labels spent (a single point: its value)."""
    x, y = np.asarray(labels, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if len(x) < 2 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean over seeds: mean ± t_{(1+level)/2, n−1}·sd/√n (one seed: NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return (math.nan, math.nan)
    half = float(sstats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return (float(v.mean() - half), float(v.mean() + half))


def summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy and curve: the area of each seed's curve, their mean, sd, min, max and 95% interval."""
    mods = sorted({k.split(".", 1)[1] for r in rows for k in r if k.startswith("unimodal.")})
    curves = list(MAIN_CURVES) + [f"unimodal.{m}" for m in mods]
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        seeds = sorted({r["seed"] for r in mine})
        for curve in curves:
            areas = []
            for seed in seeds:
                pts = sorted((r for r in mine if r["seed"] == seed), key=lambda r: r["round"])
                areas.append(area([p["labels"] for p in pts], [curve_value(p, curve) for p in pts]))
            lo, hi = interval(areas)
            out.append({"strategy": strategy, "curve": curve, "seeds": len(areas), "area": float(np.mean(areas)),
                        "sd": float(np.std(areas, ddof=1)) if len(areas) > 1 else math.nan,
                        "low": lo, "high": hi, "min": float(min(areas)), "max": float(max(areas)),
                        "per_seed": [float(a) for a in areas]})
    return out


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV text of ``rows`` (columns: ``columns`` or the first row's keys; lists joined by ';')."""
    cols = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (";".join(f"{x:.6g}" for x in v) if isinstance(v, list)
                             else "" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return buf.getvalue()
