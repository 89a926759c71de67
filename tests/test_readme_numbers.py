"""README's performance line quotes the committed benchmark run (benchmarks/results.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quoted_ranges() -> dict[int, tuple[float, float]]:
    text = " ".join((ROOT / "README.md").read_text().split())
    start = text.index("**The whole default analysis**")
    line = text[start:text.index("on the small benchmark model", start)]
    found = re.findall(r"(\d+\.\d)-(\d+\.\d)x (?:one plain evaluation pass )?at N = (\d+)k", line)
    return {int(n) * 1000: (float(lo), float(hi)) for lo, hi, n in found}


def test_readme_quotes_the_committed_cost_ratios():
    rows = json.loads((ROOT / "benchmarks" / "results.json").read_text())["cost"]["rows"]
    quoted = _quoted_ranges()
    assert set(quoted) == {1000, 5000, 20000}
    for n, (lo, hi) in quoted.items():
        ratios = [round(r["full_ratio"], 1) for r in rows if r["N"] == n]
        assert ratios and (min(ratios), max(ratios)) == (lo, hi), (n, ratios, (lo, hi))
