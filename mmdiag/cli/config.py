"""Config resolution: CLI flags > ``--config FILE`` / ``mmdiag.toml`` / ``[tool.mmdiag]`` > defaults.

A config file holds the same settings as the flags (dashes or underscores), plus tables:
``[model_kwargs]`` (passed to the model factory), ``[data_kwargs]``, ``[params.<diagnostic>]``
(diagnostic parameters), ``[thresholds]`` (verdict thresholds), ``[gate]`` (gate rules),
``[deployment]`` (the test-time distribution of missing modalities: ``missing`` or ``combinations``) and
``[collect]`` (evidence sampling: the :class:`~mmdiag.collect.CollectSettings` fields that have no
flag). An unknown key is an error that names the closest known key.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from mmdiag.errors import ConfigError
from mmdiag.registry import closest
from mmdiag.validation import COLLECT, SETTINGS, THRESHOLDS, Spec, check_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TABLES = ("model_kwargs", "data_kwargs", "params", "thresholds", "gate", "rebalance", "collect", "deployment")

#: CollectSettings fields set by flags of their own, so not in [collect]
FLAGGED_COLLECT = {"batch_size": "--batch-size", "num_workers": "--num-workers", "device": "--device",
                   "seed": "--seed", "max_feature_samples": "--max-probe-samples", "max_subsets": "--max-subsets"}


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; ConfigError with the parser's message on a syntax error."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from None


def find_config(explicit: Path | None, cwd: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """The config mapping and where it came from: --config, ./mmdiag.toml, or [tool.mmdiag] in ./pyproject.toml."""
    if explicit is not None:
        data = read_toml(explicit)
        if explicit.name == "pyproject.toml":
            data = data.get("tool", {}).get("mmdiag", {})
        return data, str(explicit)
    here = cwd or Path.cwd()
    if (here / "mmdiag.toml").is_file():
        return read_toml(here / "mmdiag.toml"), "mmdiag.toml"
    if (here / "pyproject.toml").is_file():
        tool = read_toml(here / "pyproject.toml").get("tool", {}).get("mmdiag")
        if tool:
            return dict(tool), "pyproject.toml [tool.mmdiag]"
    return {}, None


def normalise_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """Dashes to underscores in top-level keys."""
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def registry_choices(schema: Mapping[str, Spec]) -> dict[str, Spec]:
    """``schema`` with the choices that the registry decides filled in: ``balance_of`` takes the
    contribution measures balance can summarise (plug-ins included)."""
    out = dict(schema)
    if "balance_of" in out:
        from mmdiag.diagnostics.balance import measures

        out["balance_of"] = replace(out["balance_of"], choices=measures())
    return out


def resolve(ctx: Any, values: dict[str, Any], config: Mapping[str, Any], source: str | None,
            allowed: Iterable[str], schema: Mapping[str, Spec] = SETTINGS) -> dict[str, Any]:
    """Merge config values under the command's flags, and check each by type and range.

    A flag given on the command line (or by environment) wins; otherwise a config value replaces the
    flag's default. Keys that are neither flags of the command nor known tables are an error; so is
    a value that does not fit its entry in ``schema`` (the message names the flag or the config key).
    """
    allowed = set(allowed)
    cfg = normalise_keys(config)
    for key in cfg:
        if key not in allowed and key not in TABLES:
            near = closest(key, sorted(allowed | set(TABLES)))
            hint = f" Did you mean {near!r}?" if near else ""
            raise ConfigError(f"Unknown key {key!r} in {source or 'the config'}.{hint}")
    merged = dict(values)
    from_config: set[str] = set()
    for key, value in cfg.items():
        if key in TABLES or key not in values:
            continue
        # compare by name: the enum lives in click, or in typer's vendored copy of it
        src = getattr(ctx.get_parameter_source(key), "name", None)
        if src in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        merged[key] = value
        from_config.add(key)
    flags = {p.name: p.opts[0] for p in getattr(getattr(ctx, "command", None), "params", []) if p.opts}

    def name(key: str) -> str:
        if key in from_config:
            return f"{key} in {source or 'the config'}"
        return flags.get(key, "--" + key.replace("_", "-"))

    return check_fields(merged, registry_choices(schema), name)


def check_flags(ctx: Any, values: dict[str, Any], schema: Mapping[str, Spec] = SETTINGS) -> dict[str, Any]:
    """Check values that come from flags (or a saved run) by type and range, naming the flags."""
    flags = {p.name: p.opts[0] for p in getattr(getattr(ctx, "command", None), "params", []) if p.opts}
    return check_fields(values, registry_choices(schema), lambda key: flags.get(key, "--" + key.replace("_", "-")))


def table(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A table of the config (``{}`` when absent); ConfigError when it is not a table."""
    value = normalise_keys(config).get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] in the config must be a table; found {type(value).__name__}.")
    return dict(value)


def collect_settings(config: Mapping[str, Any], source: str | None = None, **flags: Any) -> Any:
    """:class:`~mmdiag.collect.CollectSettings` from the flags' values and the config's ``[collect]`` table."""
    from dataclasses import fields

    from mmdiag.collect import CollectSettings

    extra = table(config, "collect")
    known = sorted(f.name for f in fields(CollectSettings) if f.name not in FLAGGED_COLLECT)
    for key in extra:
        if key in FLAGGED_COLLECT:
            raise ConfigError(f"[collect] {key} is set with {FLAGGED_COLLECT[key]} (or the top-level key "
                              f"{key.replace('_', '-')!r}), not in [collect].")
        if key not in known:
            near = closest(key, known)
            hint = f" Did you mean {near!r}?" if near else f" Known: {', '.join(known)}."
            raise ConfigError(f"Unknown key {key!r} in [collect].{hint}")
    extra = check_fields(extra, COLLECT, lambda key: f"[collect] {key} in {source or 'the config'}")
    return CollectSettings(**flags, **extra)


def verdict_thresholds(config: Mapping[str, Any], source: str | None = None) -> Any:
    """:class:`~mmdiag.verdict.VerdictThresholds` from the config's ``[thresholds]`` table, checked key by key."""
    from mmdiag.verdict import VerdictThresholds

    values = table(config, "thresholds")
    for key in values:
        if key not in THRESHOLDS:
            near = closest(key, list(THRESHOLDS))
            hint = f" Did you mean {near!r}?" if near else f" Known: {', '.join(THRESHOLDS)}."
            raise ConfigError(f"Unknown key {key!r} in [thresholds] of {source or 'the config'}.{hint}")
    values = check_fields(values, THRESHOLDS, lambda key: f"[thresholds] {key} in {source or 'the config'}")
    return VerdictThresholds(**values)


def diagnostic_params(config: Mapping[str, Any], source: str | None = None) -> dict[str, dict[str, Any]]:
    """The ``[params.<diagnostic>]`` tables, checked: known diagnostics, known parameters, right types."""
    from mmdiag.api import build_diagnostics

    where = source or "the config"
    params: dict[str, dict[str, Any]] = {}
    for name, value in table(config, "params").items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"[params.{name}] in {where} must be a table of the diagnostic's parameters "
                              f"(e.g. [params.{name}] then key = value lines); found {value!r}.")
        params[name] = dict(value)
    try:
        build_diagnostics(list(params), params)  # unknown names, parameters and types fail here
    except ConfigError as exc:
        raise ConfigError(f"[params] in {where}: {exc}") from None
    return params


#: the keys of ``[deployment]``: one of the two forms of the distribution (mmdiag.deployment)
DEPLOYMENT_KEYS = ("missing", "combinations")


def deployment_params(config: Mapping[str, Any], source: str | None, missing: Any = None) -> dict[str, Any]:
    """The ``deployment`` diagnostic's distribution parameters from ``--missing`` (or the top-level
    ``missing`` key) and the ``[deployment]`` table, parsed and checked; ``{}`` when none is given.

    The flag wins over the table; the config may set the distribution once (top-level ``missing``,
    or ``[deployment]`` with ``missing`` or ``combinations``).
    """
    from mmdiag.deployment import distribution

    where = source or "the config"
    dep = table(config, "deployment")
    unknown = [k for k in dep if k not in DEPLOYMENT_KEYS]
    if unknown:
        near = closest(unknown[0], list(DEPLOYMENT_KEYS))
        hint = f" Did you mean {near!r}?" if near else ""
        raise ConfigError(f"Unknown key {unknown[0]!r} in [deployment] of {where} (keys: missing, combinations).{hint}")
    if "missing" in normalise_keys(config) and dep:
        raise ConfigError(f"{where} sets the deployment distribution twice (top-level missing and [deployment]); "
                          "keep one.")
    try:
        if missing is not None:
            return distribution(missing=missing).params()
        return distribution(dep.get("missing"), dep.get("combinations")).params()
    except ConfigError as exc:
        origin = "--missing" if missing is not None else f"[deployment] in {where}"
        raise ConfigError(f"{origin}: {exc}") from None


def with_deployment(params: dict[str, dict[str, Any]], deployment: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``params`` with the deployment distribution (:func:`deployment_params`) replacing any that
    ``[params.deployment]`` gave; unchanged when there is none."""
    if not deployment:
        return params
    own = {k: v for k, v in params.get("deployment", {}).items() if k not in DEPLOYMENT_KEYS}
    return {**params, "deployment": {**own, **deployment}}
