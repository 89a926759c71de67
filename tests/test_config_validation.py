"""Every setting is checked by type and range, from a flag, a config file or the library.

One schema (``mmdiag.validation``) serves the flags and config keys of ``analyze`` and
``rebalance``, the ``[collect]`` and ``[thresholds]`` tables, :class:`CollectSettings`,
:class:`VerdictThresholds` and ``api.analyze``. A wrong value exits 2 with a message naming the key,
what it must be and what was found, before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmdiag import validation
from mmdiag.api import analyze as api_analyze
from mmdiag.api import build_diagnostics
from mmdiag.cli.analyze import SETTINGS as ANALYZE_SETTINGS
from mmdiag.cli.app import app
from mmdiag.cli.rebalance_cmd import SETTINGS as REBALANCE_SETTINGS
from mmdiag.collect import CollectSettings
from mmdiag.errors import ConfigError
from mmdiag.verdict import VerdictThresholds

runner = CliRunner()


def config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(textwrap.dedent(body))
    return path


def analyze(tmp_path: Path, body: str, *flags: str):
    # no model or data exist: every case must fail on the settings, before anything is loaded
    return runner.invoke(app, ["analyze", "--config", str(config(tmp_path, body)), "--model", "nowhere.py:build",
                               "--data", "nowhere.npz", "--out", str(tmp_path / "out"), *flags])


def assert_refused(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in res.output, res.output
    assert "does not exist" not in res.output and "was not found" not in res.output  # nothing was loaded


# ------------------------------------------------------------------------------------- config keys


@pytest.mark.parametrize("body, needles", [
    ('bootstrap = "lots"', ["bootstrap in", "must be an integer >= 0", "'lots' (a string)"]),
    ("bootstrap = -5", ["bootstrap in", "must be an integer >= 0", "found -5"]),
    ("seed = 1.5", ["seed in", "must be an integer >= 0", "found 1.5"]),
    ('seed = "3"', ["seed in", "Write the number without quotes"]),
    ("batch-size = 0", ["batch_size in", "must be an integer >= 1", "found 0"]),
    ("num_workers = -1", ["num_workers in", "integer >= 0"]),
    ("max_subsets = 0", ["max_subsets in", "integer >= 1"]),
    ("max_probe_samples = true", ["max_probe_samples in", "true (a boolean)"]),
    ('overwrite = "yes"', ["overwrite in", "must be true or false", "'yes' (a string)"]),
    ("per_sample = 1", ["per_sample in", "must be true or false"]),
    ('mask = "zeros"', ["mask in", "one of zero, mean, noise", "Did you mean 'zero'?"]),
    ('mask_at = "encoder"', ["mask_at in", "one of input, feature"]),
    ('call = "dictionary"', ["call in", "one of dict, kwargs, positional"]),
    ('nan_policy = "drop"', ["nan_policy in", "one of error, skip"]),
    ('balance_of = "shapely"', ["balance_of in", "Did you mean 'shapley'?"]),
    ('device = "gpu"', ["device in", "auto, cpu, mps, cuda or cuda:N", "'gpu'"]),
    ('device = "cuda:x"', ["device in", "cuda:N"]),
    ("num_classes = 0", ["num_classes in", "integer >= 1"]),
    ("only = 3", ["only in", "a comma-separated string or a list of strings"]),
    ("bootstrap = inf", ["bootstrap in", "found inf"]),
])
def test_config_values_are_checked_by_type_and_range(tmp_path: Path, body: str, needles: list[str]) -> None:
    res = analyze(tmp_path, body)
    assert_refused(res, *needles)
    assert str(tmp_path / "cfg.toml") in res.output  # names where the value came from


@pytest.mark.parametrize("flags, needles", [
    (["--bootstrap", "-5"], ["--bootstrap must be an integer >= 0", "found -5"]),
    (["--seed", "-1"], ["--seed must be an integer >= 0"]),
    (["--batch-size", "0"], ["--batch-size must be an integer >= 1"]),
    (["--num-workers", "-2"], ["--num-workers must be an integer >= 0"]),
    (["--max-subsets", "0"], ["--max-subsets must be an integer >= 1"]),
    (["--mask", "zeros"], ["--mask must be one of zero, mean, noise"]),
    (["--device", "gpu"], ["--device must be auto, cpu, mps, cuda or cuda:N"]),
    (["--nan-policy", "ignore"], ["--nan-policy must be one of error, skip"]),
])
def test_flags_are_checked_by_the_same_schema(tmp_path: Path, flags: list[str], needles: list[str]) -> None:
    assert_refused(analyze(tmp_path, "", *flags), *needles)


def test_a_flag_wins_over_a_bad_config_value_and_is_named_when_bad(tmp_path: Path) -> None:
    # the bad config value is replaced by the flag, so the flag is what gets checked and named
    res = analyze(tmp_path, "bootstrap = 10", "--bootstrap", "-1")
    assert_refused(res, "--bootstrap must be")
    assert "bootstrap in" not in res.output


def test_lists_are_accepted_where_the_flag_takes_a_comma_separated_string(tmp_path: Path) -> None:
    class Ctx:
        command = None

        def get_parameter_source(self, key):
            return None

    from mmdiag.cli import config as cfg

    values = {"only": None, "modalities": None, "encoder": None, "bootstrap": 1000}
    o = cfg.resolve(Ctx(), values, {"only": ["shapley", "reliance"], "modalities": ["a", "b"],
                                    "encoder": {"a": "a_net", "b": "b_net"}}, "cfg", values)
    assert o["only"] == "shapley,reliance" and o["modalities"] == "a,b"
    assert o["encoder"] == ["a=a_net", "b=b_net"]


# ------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("body, needles", [
    ("[collect]\ngrad_fraction = 2", ["[collect] grad_fraction in", "a number in (0, 1]", "found 2"]),
    ('[collect]\npermutations = "5"', ["[collect] permutations in", "integer >= 1"]),
    ("[collect]\nnoise_levels = [0, 1]", ["[collect] noise_levels in", "list of integers >= 1"]),
    ("[collect]\nnoise_levels = 3", ["[collect] noise_levels in", "list of integers"]),
    ('[collect]\npool = "max"', ["[collect] pool in", "one of mean, first, flatten"]),
    ("[collect]\ngrad_fractoin = 0.5", ["Unknown key 'grad_fractoin' in [collect]", "Did you mean 'grad_fraction'?"]),
    ("[thresholds]\nmlid = 0.3", ["Unknown key 'mlid' in [thresholds]", "Did you mean 'mild'?"]),
    ('[thresholds]\nmild = "low"', ["[thresholds] mild in", "a number in [0, 1]", "'low' (a string)"]),
    ("[thresholds]\nstrong = 1.5", ["[thresholds] strong in", "a number in [0, 1]"]),
    ('[thresholds]\nrequire_separation = "yes"', ["[thresholds] require_separation in", "true or false"]),
    ("[thresholds]\nmild = 0.6\nstrong = 0.5", ["0 <= mild <= strong <= 1"]),
    ("[params.shapely]\nx = 1", ["[params]", "Unknown diagnostic 'shapely'", "Did you mean 'shapley'?"]),
    ("[params.mdi]\nlamb = 0.5", ["[params]", "no parameter 'lamb'", "Did you mean 'lam'?"]),
    ('[params.mdi]\nlam = "half"', ["[params]", "parameter 'lam' of diagnostic 'mdi'", "must be a number"]),
    ('[params.probe]\nmax_iter = 2.5', ["parameter 'max_iter' of diagnostic 'probe'", "must be an integer"]),
    ("[params]\nshapley = 3", ["[params.shapley]", "must be a table"]),
    ("[params.cal]\nlam = 2.0", ["[params]", "cal: lam must lie in [0, 1]"]),
    ("bootstrp = 3", ["Unknown key 'bootstrp'", "Did you mean 'bootstrap'?"]),
])
def test_tables_are_checked_and_unknown_keys_name_the_closest(tmp_path: Path, body: str, needles: list[str]) -> None:
    assert_refused(analyze(tmp_path, body), *needles)


# ------------------------------------------------------------------------------------------ rebalance


@pytest.mark.parametrize("args, needles", [
    (["--lr", "0"], ["--lr must be a number > 0", "found 0.0"]),
    (["--lr", "-1"], ["--lr must be a number > 0"]),
    (["--epochs", "0"], ["--epochs must be an integer >= 1"]),
    (["--weight-decay", "-0.1"], ["--weight-decay must be a number >= 0"]),
    (["--grad-clip", "0"], ["--grad-clip must be a number > 0"]),
    (["--bootstrap", "-5"], ["--bootstrap must be an integer >= 0"]),
    (["--optimizer", "sgdm"], ["--optimizer must be one of sgd, adam, adamw", "Did you mean 'sgd'?"]),
    (["--init", "pretrained"], ["--init must be one of scratch, checkpoint"]),
])
def test_rebalance_flags_are_checked(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    res = runner.invoke(app, ["rebalance", "--config", str(config(tmp_path, "")), "--model", "nowhere.py:build",
                              "--data", "nowhere.npz", "--out", str(tmp_path / "out"), *args])
    assert_refused(res, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body, needles", [
    ("lr = \"fast\"", ["lr in", "must be a number > 0", "'fast' (a string)"]),
    ("epochs = 2.5", ["epochs in", "must be an integer >= 1"]),
    ("baseline = \"yes\"", ["baseline in", "must be true or false"]),
    ("[rebalance]\nmomentum = -0.5", ["momentum in", "must be a number >= 0"]),
    ("[collect]\nig_tolerance = -1", ["[collect] ig_tolerance in", "a number >= 0"]),
    ("[thresholds]\nprobe_gapp = 0.1", ["Unknown key 'probe_gapp' in [thresholds]", "Did you mean 'probe_gap'?"]),
])
def test_rebalance_config_is_checked(tmp_path: Path, body: str, needles: list[str]) -> None:
    res = runner.invoke(app, ["rebalance", "--config", str(config(tmp_path, body)), "--model", "nowhere.py:build",
                              "--data", "nowhere.npz", "--out", str(tmp_path / "out")])
    assert_refused(res, *needles)


# -------------------------------------------------------------------------------------------- library


@pytest.mark.parametrize("kw, needle", [
    ({"batch_size": 0}, "CollectSettings.batch_size must be an integer >= 1"),
    ({"batch_size": "8"}, "CollectSettings.batch_size must be an integer >= 1; found '8' (a string)"),
    ({"seed": 1.5}, "CollectSettings.seed must be an integer >= 0; found 1.5"),
    ({"seed": -1}, "CollectSettings.seed must be an integer >= 0"),
    ({"num_workers": True}, "CollectSettings.num_workers must be an integer >= 0; found true (a boolean)"),
    ({"grad_fraction": 0.0}, "CollectSettings.grad_fraction must be a number in (0, 1]"),
    ({"device": "gpu"}, "CollectSettings.device must be auto, cpu, mps, cuda or cuda:N"),
    ({"noise_levels": ()}, "CollectSettings.noise_levels must be a non-empty list of integers"),
    ({"ig_steps": 16, "ig_max_steps": 8}, "ig_max_steps (8) must be at least ig_steps (16)"),
])
def test_collect_settings_reject_bad_values(kw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        CollectSettings(**kw)
    assert needle in str(info.value)


def test_collect_settings_accept_numpy_integers_and_lists() -> None:
    import numpy as np

    cs = CollectSettings(batch_size=np.int64(8), noise_levels=[1, 2, 3])
    assert cs.noise_levels == (1, 2, 3)


@pytest.mark.parametrize("kw, needle", [
    ({"bootstrap": -5}, "bootstrap must be an integer >= 0"),
    ({"bootstrap": "lots"}, "bootstrap must be an integer >= 0 (0 computes no intervals); found 'lots'"),
    ({"seed": 1.5}, "seed must be an integer >= 0; found 1.5"),
])
def test_api_analyze_rejects_bad_bootstrap_and_seed_before_running_the_model(kw: dict, needle: str) -> None:
    class Boom(torch.nn.Module):
        def forward(self, a, b):  # never reached
            raise AssertionError("the model ran")

    data = {"a": torch.zeros(4, 2).numpy(), "b": torch.zeros(4, 2).numpy(), "label": [0, 1, 0, 1]}
    with pytest.raises(ConfigError) as info:
        api_analyze(Boom(), data, **kw)
    assert needle in str(info.value)
    with pytest.raises(ConfigError):
        build_diagnostics(["shapley"], **kw)


def test_verdict_thresholds_reject_bad_types() -> None:
    with pytest.raises(ConfigError, match="require_separation must be true or false"):
        VerdictThresholds(require_separation="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="noise_calibration must be a number in"):
        VerdictThresholds(noise_calibration=2.0)


# --------------------------------------------------------------------------------- schema coverage


def test_the_schema_covers_every_setting_field_and_threshold() -> None:
    assert not set(ANALYZE_SETTINGS) - set(validation.SETTINGS), "add the new analyze setting to validation.SETTINGS"
    assert not set(REBALANCE_SETTINGS) - set(validation.REBALANCE), "add the new setting to validation.SETTINGS"
    assert {f.name for f in dataclasses.fields(CollectSettings)} == set(validation.COLLECT)
    assert {f.name for f in dataclasses.fields(VerdictThresholds)} == set(validation.THRESHOLDS)


def test_the_schemas_choices_are_those_of_the_modules_that_use_them() -> None:
    from mmdiag.adapter import CALL_STYLES, MASK_KINDS, MASK_LEVELS
    from mmdiag.cli.config import registry_choices
    from mmdiag.diagnostics.balance import measures
    from mmdiag.loading import NAN_POLICIES
    from mmdiag.pooling import POOL_MODES
    from mmdiag.train import OPTIMIZERS

    s = validation.SETTINGS
    assert s["call"].choices == CALL_STYLES and s["mask"].choices == MASK_KINDS
    assert s["mask_at"].choices == MASK_LEVELS and s["nan_policy"].choices == NAN_POLICIES
    assert registry_choices(s)["balance_of"].choices == measures() and s["optimizer"].choices == OPTIMIZERS
    assert validation.COLLECT["pool"].choices == POOL_MODES


def test_defaults_pass_their_own_schema() -> None:
    CollectSettings()
    VerdictThresholds()
    for name, spec in validation.SETTINGS.items():
        if spec.optional:
            assert spec.check(None, name) is None
