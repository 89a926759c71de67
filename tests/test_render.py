"""Renderings: plots are real PNGs, report.html is self-contained and small, Markdown, `mmdiag render`."""

from __future__ import annotations

import base64
import io
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmdiag.cli.app import app
from mmdiag.render import parse_formats, write_outputs
from mmdiag.render.html import doc_parts, render_html
from mmdiag.render.markdown import render_markdown
from mmdiag.render.plots import (OKABE_ITO, PlotSet, modality_colors, plot_before_after, plot_training_dynamics,
                                 report_plots)
from mmdiag.report import Failure, Report, Result, Verdict
from mmdiag.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ci(rng: np.random.Generator, v: float, w: float = 0.05) -> list[float]:
    a = float(rng.uniform(0.2, 1.0) * w)
    return [v - a, v + float(rng.uniform(0.2, 1.0) * w)]


def synthetic_report(m_count: int = 2, n_classes: int = 10, seed: int = 0, shift: float = 0.0,
                     with_failures: bool = True) -> Report:
    """A report with every kind of diagnostic the renderers know about, built by hand (fast)."""
    rng = np.random.default_rng(seed)
    mods = ["audio", "visual"] if m_count == 2 else [f"m{j}" for j in range(m_count)]
    weights = np.linspace(1.0, 0.3, m_count) + shift * np.linspace(-1, 1, m_count)
    weights = weights / weights.sum()

    def res(name: str, values: dict[str, float], value: float | None, hib: bool | None = True,
            details: dict | None = None, value_ci: list[float] | None = None) -> Result:
        return Result(name=name, value=value, per_modality=values,
                      ci={m: _ci(rng, v) for m, v in values.items()}, value_ci=value_ci, higher_is_better=hib,
                      params={"bootstrap": 200, "seed": seed, "level": 0.95}, details=details or {},
                      summary=f"{name} summary line")

    diags: dict[str, Result] = {}
    shap = {m: float(0.9 * w) for m, w in zip(mods, weights)}
    diags["shapley"] = res("shapley", shap, max(shap.values()) - min(shap.values()))
    rel = {m: float(0.8 * w) for m, w in zip(mods, weights)}
    diags["reliance"] = res("reliance", rel, max(rel.values()) - min(rel.values()), hib=None)
    for name in ("attribution", "mdi", "cal"):
        vals = {m: float(w + rng.normal(0, 0.02)) for m, w in zip(mods, weights)}
        diags[name] = res(name, vals, float(np.std(list(vals.values()))))
    subsets = [c for k in range(1, m_count + 1) for c in itertools.combinations(mods, k)]
    acc = {"+".join(s): float(min(1.0, 0.1 + sum(weights[mods.index(m)] for m in s))) for s in subsets}
    diags["combinations"] = res(
        "combinations", {m: acc["+".join(x for x in mods if x != m)] if m_count > 1 else 0.1 for m in mods},
        min(acc.values()), details={"accuracy": acc, "ci": {k: _ci(rng, v, 0.03) for k, v in acc.items()},
                                    "weakest": min(acc, key=acc.get), "chance": 1.0 / n_classes},
        value_ci=_ci(rng, min(acc.values())))
    uni = {m: float(0.1 + 0.9 * w * m_count / 2) for m, w in zip(mods, weights)}
    per_class = {m: {str(c): float(np.clip(uni[m] + rng.normal(0, 0.2), 0, 1)) for c in range(n_classes)} for m in mods}
    per_class[mods[-1]]["3"] = None  # a class with no sample
    diags["unimodal"] = res("unimodal", uni, max(uni.values()) - min(uni.values()),
                            details={"per_class": per_class, "chance": 1.0 / n_classes, "fused_accuracy": 0.95})
    levels = list(range(1, 12))
    diags["udml"] = res("udml", {m: float(0.5 + w) for m, w in zip(mods, weights)}, 0.4, details={
        "calibration": {m: [{"level": lv, "mean_pred": float(lv * (0.6 + 0.3 * j / m_count) + rng.normal(0, 0.3)),
                             "std_pred": float(0.3 + 0.05 * lv)} for lv in levels] for j, m in enumerate(mods)}})
    diags["perceptual"] = res("perceptual", {m: float(0.5 * w) for m, w in zip(mods, weights)}, 0.2, details={
        "permutations": {m: [float(0.5 * w + rng.normal(0, 0.02)) for _ in range(5)] for m, w in zip(mods, weights)}})
    diags["balance"] = res("balance", {m: float(w) for m, w in zip(mods, weights)},
                           float(1 - (weights.max() - 1 / m_count)), value_ci=[0.55, 0.7])
    failures = [Failure("probe", "needs encoder features; the model is a black box", "skipped"),
                Failure("gradient_conflict", "RuntimeError: something broke", "error")] if with_failures else []
    verdict = Verdict(dominant=mods[0], underused=[mods[-1]], severity="mild", recommended_fix="ogm_ge",
                      reasons=["shapley: m0 holds most of the positive contribution",
                               "reliance agrees that m0 is relied on most"])
    return Report(modalities=mods, n_samples=500, accuracy=0.95, diagnostics=diags, failures=failures,
                  verdict=verdict, mmdiag_version="test",
                  settings={"model": "toy.py:build", "data": "toy.npz", "seed": seed, "bootstrap": 200,
                            "params": {"shapley": {"bootstrap": 200}}})


def assert_real_png(data: bytes, min_size: int = 5000) -> None:
    import matplotlib.image as mpimg

    assert data[:8] == PNG_MAGIC
    assert len(data) > min_size
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert float(np.var(img[..., :3])) > 1e-3, "the image is (nearly) a single colour"


# ------------------------------------------------------------------------------------------- plots


@pytest.fixture(scope="module")
def report6() -> Report:
    return synthetic_report(6)


@pytest.fixture(scope="module")
def plots6(report6: Report, tmp_path_factory: pytest.TempPathFactory):
    return report_plots(report6, tmp_path_factory.mktemp("plots6"))


def test_every_plot_is_a_real_png(plots6) -> None:
    expected = {"contributions", "combinations_heatmap", "unimodal_per_class", "udml_calibration", "perceptual_spread"}
    assert expected <= set(plots6.images)
    assert {f"{n}_bars" for n in ("shapley", "reliance", "balance", "cal", "mdi")} <= set(plots6.images)
    for key, path in plots6.paths.items():
        assert path.suffix == ".png"
        assert_real_png(path.read_bytes())
    assert not [r for r in plots6.skipped.values() if r.startswith("could not")]


def test_colours_fixed_per_modality_and_colour_blind_safe() -> None:
    colours = modality_colors(["audio", "visual", "depth"])
    assert list(colours.values()) == list(OKABE_ITO[:3])
    assert modality_colors(["audio", "visual"])["visual"] == colours["visual"]
    assert len(set(modality_colors([f"m{j}" for j in range(12)]).values())) == 12


def test_missing_or_malformed_data_skips_the_plot(tmp_path: Path) -> None:
    rep = synthetic_report(2)
    rep.diagnostics = {"shapley": rep.diagnostics["shapley"]}
    rep.diagnostics["udml"] = Result("udml", 0.1, {"audio": 0.2}, details={"calibration": "garbage"})
    rep.diagnostics["perceptual"] = Result("perceptual", None, {}, details={"whatever": [1, 2]})
    rep.diagnostics["combinations"] = Result("combinations", 0.5, {"audio": 0.5}, details={"accuracy": {"audio": "x"}})
    rep.diagnostics["unimodal"] = Result("unimodal", 0.1, {}, details={"per_class": {"audio": [0.1]}})
    plots = report_plots(rep, tmp_path)
    assert "udml_calibration" in plots.skipped and "perceptual_spread" in plots.skipped
    assert "unimodal_per_class" not in plots.images
    assert "contributions" in plots.images  # the rest still renders
    html = render_html(rep, plots)
    assert "<html" in html


def test_training_dynamics_and_before_after(tmp_path: Path) -> None:
    import pandas as pd

    rows = []
    for e in range(8):
        rows.append({"epoch": e, "loss": 2.0 / (e + 1), "acc": 0.5 + e * 0.05, "val_acc": 0.45 + e * 0.05,
                     "unimodal_acc.audio": 0.4 + e * 0.06, "unimodal_acc.visual": 0.2 + e * 0.02,
                     "signal.coeff.audio": 1 - e * 0.05, "signal.coeff.visual": 1.0,
                     "signal.ratio.audio": 1.5 - e * 0.05, "signal.ratio.visual": 0.7 + e * 0.03})
    path = plot_training_dynamics(pd.DataFrame(rows), tmp_path / "dyn.png")
    assert path is not None
    assert_real_png(path.read_bytes())
    assert plot_training_dynamics([], tmp_path / "none.png") is None

    from mmdiag.compare import compare

    cmp_rows = compare(synthetic_report(3, seed=0), synthetic_report(3, seed=1, shift=0.3))
    path = plot_before_after(cmp_rows, tmp_path / "ba.png")
    assert path is not None
    assert_real_png(path.read_bytes())
    dict_rows = [{"diagnostic": "shapley", "modality": "audio", "before": 0.6, "after": 0.45, "ci_a": [0.55, 0.65],
                  "ci_b": [0.4, 0.5], "separated": True},
                 {"diagnostic": "shapley", "modality": "visual", "before": 0.2, "after": 0.4}]
    assert plot_before_after(dict_rows, tmp_path / "ba2.png") is not None
    assert plot_before_after([], tmp_path / "ba3.png") is None


# -------------------------------------------------------------------------------------------- html


def test_html_is_self_contained_small_and_complete(report6: Report, plots6, tmp_path: Path) -> None:
    html = render_html(report6, plots6)
    path = tmp_path / "report.html"
    path.write_text(html)
    size = path.stat().st_size
    assert size < 3 * 1024 * 1024, size
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "@import" not in html and "url(http" not in html
    # verdict first, with its fields
    v = html.index('id="verdict"')
    assert v < html.index('id="overview"') < html.index('id="diag-')
    assert report6.verdict.headline() in html
    for word in ("dominant", "under-used", "severity", "recommended fix", "ogm_ge"):
        assert word in html
    for name in report6.diagnostics:
        assert f'id="diag-{name}"' in html
    assert 'id="failures"' in html and "black box" in html and "RuntimeError" in html
    assert 'id="settings"' in html and "toy.py:build" in html
    # plots embedded, decodable
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == len(plots6.images)
    assert base64.b64decode(images[0])[:8] == PNG_MAGIC


def test_how_to_read_and_scale_come_from_the_declarations() -> None:
    from mmdiag.diagnostics import DIAGNOSTICS

    title, how = doc_parts("shapley")
    assert title.startswith("Shapley")
    assert how == " ".join(DIAGNOSTICS.get("shapley").how_to_read.split())
    assert doc_parts("not_a_diagnostic") == ("", "")
    for name in DIAGNOSTICS.names():  # every built-in declares what the report shows
        cls = DIAGNOSTICS.get(name)
        assert cls.how_to_read and cls.scale and cls.higher_means and cls.figures, name
        assert "How to read it" not in (cls.__doc__ or ""), f"{name}: the reading guide lives in how_to_read"
    rep = synthetic_report(2, with_failures=False)
    html = render_html(rep, PlotSet())  # no plots: text only, fast
    assert "How to read this" in html
    assert "Per modality: accuracy added (Shapley value); higher means" in html
    assert "udml summary line" in html  # unregistered diagnostic: falls back to Result.summary


def test_each_result_draws_the_figures_its_diagnostic_declares(monkeypatch, tmp_path: Path) -> None:
    from mmdiag.diagnostics import DIAGNOSTICS
    from mmdiag.render.figures import FIGURES

    rep = synthetic_report(2, with_failures=False)
    rep.diagnostics = {n: rep.diagnostics[n] for n in ("shapley", "udml", "combinations")}
    # a declared figure no module registers is skipped with a reason; the rest still renders
    monkeypatch.setattr(DIAGNOSTICS.get("shapley"), "figures", ("modality_bars", "no_such_figure"))
    plots = report_plots(rep)
    for name in rep.diagnostics:
        for figure in DIAGNOSTICS.get(name).figures:
            key = FIGURES.get(figure).key.format(name=name) if figure in FIGURES else f"{name}_{figure}"
            assert key in plots.by_diagnostic[name] or key in plots.skipped, (name, figure)
    assert plots.by_diagnostic["udml"] == ["udml_bars", "udml_calibration"]
    assert "no installed module registers" in plots.skipped["shapley_no_such_figure"]


def test_markdown(report6: Report) -> None:
    md = render_markdown(report6)
    assert md.startswith("## mmdiag report")
    assert report6.verdict.headline() in md
    assert "| shapley |" in md and "| m5 |" in md  # m5 is the under-used modality of the verdict table
    assert "| diagnostic | headline | m0 | m1 | m2 | m3 | m4 | m5 |" in md
    assert "Failed and skipped" in md and "gradient_conflict" in md


def tiny_report() -> Report:
    """Two diagnostics only: quick to render."""
    rep = synthetic_report(2)
    rep.diagnostics = {k: v for k, v in rep.diagnostics.items() if k in ("shapley", "balance")}
    return rep


def test_write_outputs_formats(tmp_path: Path) -> None:
    rep = tiny_report()
    written = write_outputs(rep, tmp_path / "a")
    names = {p.name for p in written}
    assert {"report.json", "metrics.csv", "report.html", "contributions.png"} <= names
    assert "report.md" not in names
    written = write_outputs(rep, tmp_path / "b", formats="md,html")
    assert {p.name for p in written} == {"report.md", "report.html"}
    assert not (tmp_path / "b" / "plots").exists()
    assert parse_formats("HTML, markdown,png") == ("html", "md", "png")
    with pytest.raises(ConfigError, match="Did you mean 'html'"):
        parse_formats("htm")


def test_render_command(tmp_path: Path) -> None:
    rep = tiny_report()
    rep.save(tmp_path / "report.json")
    runner = CliRunner()
    result = runner.invoke(app, ["render", str(tmp_path / "report.json"), "--format", "html,md,csv,png",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    for name in ("report.html", "report.md", "metrics.csv", "plots/contributions.png"):
        assert (tmp_path / "r" / name).is_file(), name
    bad = runner.invoke(app, ["render", str(tmp_path / "report.json"), "--format", "pdf"])
    assert bad.exit_code == 2
    missing = runner.invoke(app, ["render", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2


# ------------------------------------------------------------------------- reading the html at a glance


def _section(html: str, name: str) -> str:
    """The HTML of one diagnostic's section."""
    start = html.index(f'id="diag-{name}"')
    return html[start:html.index("</section>", start)]


def _overview_row(html: str, name: str) -> str:
    start = html.index(f'<a href="#diag-{name}">', html.index('id="overview"'))
    return html[start:html.index("</tr>", start)]


def conflict_result(n_batches: int = 3, ci: tuple[float, float] = (-0.63, 0.67)) -> Result:
    """A gradient_conflict result like a short run's: few batches, wide intervals."""
    return Result("gradient_conflict", -0.5, {"audio": 0.81, "visual": -0.5},
                  ci={"audio": [0.05, 0.87], "visual": list(ci)}, value_ci=[-0.63, 0.05], higher_is_better=True,
                  details={"n_batches": n_batches, "n_rows": 64}, summary="cosine of fused and unimodal gradients",
                  headline="lowest cos")


def test_sections_follow_the_verdict_then_the_reading_order() -> None:
    from mmdiag.report_text import ordered_names

    rep = synthetic_report(2)
    rep.diagnostics = dict(reversed(list(rep.diagnostics.items())))  # stored order must not matter
    html = render_html(rep, PlotSet())
    first_section = re.search(r"<section[^>]*>", html).group(0)
    assert 'id="verdict"' in first_section
    assert html.index("<h3>Reasons</h3>") < html.index('id="overview"')
    starts = [html.index('id="overview"')] + [html.index(f'id="diag-{n}"') for n in ordered_names(rep)]
    assert starts == sorted(starts)
    assert ordered_names(rep)[:3] == ["unimodal", "shapley", "reliance"]
    rows = re.findall(r'<td class="name"><a href="#diag-([\w]+)"', html)
    assert rows == ordered_names(rep)  # the overview table reads in the same order as the terminal


def test_overview_says_what_each_diagnostic_measures() -> None:
    rep = synthetic_report(2, with_failures=False)
    rep.diagnostics["shapley"] = Result(**{**rep.diagnostics["shapley"].__dict__, "headline": "spread"})
    rep.diagnostics["plugin_metric"] = Result("plugin_metric", 0.4, {"audio": 0.1, "visual": 0.5},
                                              summary="a plug-in's own measure")  # no metadata at all
    html = render_html(rep, PlotSet())
    assert "what it measures</th>" in html and 'class="overview"' in html
    row = _overview_row(html, "shapley")
    assert "accuracy added (Shapley value)" in row and "headline: spread" in row
    assert "headline: spread" in _overview_row(html, "unimodal")  # the class declares it: an older report
    assert "a plug-in&#x27;s own measure" in _overview_row(html, "plugin_metric")  # falls back to the summary
    assert "table.overview { width: 100%; }" in html


def test_combination_cells_read_without_and_carry_no_dominant_badge() -> None:
    rep = synthetic_report(2, with_failures=False)  # cells not set: the mirrored row of an older report
    html = render_html(rep, PlotSet())
    section = _section(html, "combinations")
    assert "without audio" in section and "without visual" in section
    assert "tag dom" not in section and "tag under" not in section
    assert "tag dom" in _section(html, "shapley")  # other results keep the verdict's tags
    row = _overview_row(html, "combinations")
    assert "(without)" in row and "without audio" in row and "accuracy without the modality" in row


def test_settings_and_run_parameters_fold_into_details() -> None:
    rep = synthetic_report(2, with_failures=False)
    rep.settings["params"] = {n: {"bootstrap": 200, "seed": 0, "level": 0.95} for n in rep.diagnostics}
    html = render_html(rep, PlotSet())
    settings = html[html.index('id="settings"'):]
    folded = re.search(r"<details><summary>params\.\* \((\d+) values\)</summary>(.*?)</details>", settings, re.S)
    assert folded and int(folded.group(1)) == 3 * len(rep.diagnostics)
    assert "params.shapley.bootstrap" in folded.group(2)
    assert "params.shapley" not in settings.replace(folded.group(0), "")
    assert "toy.py:build" in settings  # short entries stay in view
    assert "<details><summary>Settings (3 values)</summary>" in _section(html, "shapley")


def test_direction_says_what_higher_means() -> None:
    html = render_html(synthetic_report(2, with_failures=False), PlotSet())
    section = _section(html, "balance")
    assert "higher means the modality holds more of the contribution" in section
    assert "higher is better" not in section


def test_too_wide_intervals_are_said_so_in_html_and_terminal() -> None:
    from mmdiag.report_text import summary_rows, too_wide

    rep = synthetic_report(2, with_failures=False)
    rep.diagnostics["gradient_conflict"] = conflict_result()
    html = render_html(rep, PlotSet())
    section = _section(html, "gradient_conflict")
    assert "Too wide to read." in section and "no finding" in section and "fewer than 5 batches" in section
    assert "too wide" in _overview_row(html, "gradient_conflict")
    assert "Too wide to read." not in _section(html, "shapley")
    row = next(r for r in summary_rows(rep) if r[0] == "gradient_conflict")
    assert row[2].endswith("(too wide)") and row[3].endswith("(too wide)")
    assert not any("too wide" in c for r in summary_rows(rep) if r[0] != "gradient_conflict" for c in r)
    # enough batches: only an interval wider than 1 is marked
    many = conflict_result(n_batches=40)
    assert too_wide(many, "visual") and not too_wide(many, "audio")
    assert not too_wide(conflict_result(n_batches=40, ci=(-0.6, -0.2)), "visual")
    assert "Too wide" not in render_html(synthetic_report(2), PlotSet())


def _texts_inside(fig) -> list[str]:
    """Titles, axis labels and annotations of a drawn figure that stick out of it (clipped in the PNG)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        if ax.get_visible():
            texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
    out = []
    for t in texts:
        if not t.get_visible() or not t.get_text():
            continue
        ext = t.get_window_extent(renderer)
        if ext.x0 < box.x0 - 1 or ext.x1 > box.x1 + 1 or ext.y0 < box.y0 - 1 or ext.y1 > box.y1 + 1:
            out.append(t.get_text())
    return out


def test_plot_titles_fit_axes_say_their_units_and_chance_sits_off_the_bars() -> None:
    from mmdiag.render.canvas import styled
    from mmdiag.render.figures import fig_contributions, fig_modality_bars

    rep = synthetic_report(2, with_failures=False)
    colours = modality_colors(rep.modalities)
    with styled():
        conflict = fig_modality_bars(conflict_result(), rep.modalities, colours)
        combos = fig_modality_bars(rep.diagnostics["combinations"], rep.modalities, colours)
        contributions = fig_contributions(rep, colours)
    assert _texts_inside(conflict) == [] and _texts_inside(combos) == [] and _texts_inside(contributions) == []
    assert "too wide to read" in conflict._suptitle.get_text()
    ax = combos.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["without audio", "without visual"]
    assert "chance" in ax.get_xlabel() and not [t for t in ax.texts if "chance" in t.get_text()]
    assert "accuracy" in ax.get_ylabel()
    labels = {a.get_title(): a.get_ylabel().replace("\n", " ") for a in contributions.axes if a.get_visible()}
    assert labels["shapley"] == "accuracy added"
    assert labels["attribution"].startswith("share of")
    assert list(labels)[:2] == ["shapley", "reliance"]  # reading order
    for fig in (conflict, combos, contributions):
        fig.clear()


def test_plots_are_readable_and_the_html_stays_small(plots6) -> None:
    import matplotlib.image as mpimg

    from mmdiag.render.canvas import DEFAULT_DPI

    assert DEFAULT_DPI >= 100
    bars_png = mpimg.imread(io.BytesIO(plots6.images["shapley_bars"]), format="png")
    assert bars_png.shape[1] >= 450  # wide enough for 10 pt labels to read at the page's width
    assert sum(len(png) for png in plots6.images.values()) < 1024 * 1024
