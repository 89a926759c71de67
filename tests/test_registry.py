"""The registry: lookups with suggestions, and plug-ins loaded lazily, once, a broken one skipped with a warning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from mmdiag.diagnostics import DIAGNOSTICS, Diagnostic
from mmdiag.errors import ConfigError, MmdiagWarning
from mmdiag.fixes import FIXES, Fix
from mmdiag.registry import Registry, check_plugin_class


@dataclass(frozen=True)
class GoodDiag(Diagnostic):
    """A stand-in plug-in diagnostic."""

    name: ClassVar[str] = "good_diag"
    summary: ClassVar[str] = "a plug-in"

    def compute(self, ev, prior=None):  # pragma: no cover - never run here
        raise NotImplementedError


@dataclass(frozen=True)
class BadMetadata(GoodDiag):
    """Declares its figures as a string instead of a tuple of names."""

    name: ClassVar[str] = "bad_metadata"
    figures: ClassVar = "modality_bars"  # type: ignore[assignment]


@dataclass(frozen=True)
class Abstract(Diagnostic):
    """No compute."""

    name: ClassVar[str] = "abstract"
    summary: ClassVar[str] = "nothing"


class FakeEntryPoint:
    def __init__(self, name: str, target: object) -> None:
        self.name, self.value, self._target = name, f"fake_plugin:{name}", target

    def load(self) -> object:
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def fake_registry(monkeypatch: pytest.MonkeyPatch, *entries: FakeEntryPoint) -> tuple[Registry, list[str]]:
    calls: list[str] = []

    def entry_points(group: str):
        calls.append(group)
        return list(entries)

    monkeypatch.setattr("mmdiag.registry.metadata.entry_points", entry_points)
    reg: Registry = Registry("diagnostic", group="test.group", check=lambda obj: check_plugin_class(obj, Diagnostic))
    return reg, calls


def test_plugins_load_lazily_once_and_broken_ones_are_skipped_with_a_warning(monkeypatch) -> None:
    reg, calls = fake_registry(
        monkeypatch,
        FakeEntryPoint("good_diag", GoodDiag),
        FakeEntryPoint("missing", ModuleNotFoundError("No module named 'fake_plugin'")),
        FakeEntryPoint("not_a_diagnostic", dict),
        FakeEntryPoint("bad_metadata", BadMetadata),
        FakeEntryPoint("abstract", Abstract),
        FakeEntryPoint("other_name", GoodDiag),
    )
    assert calls == []  # nothing is imported until the first lookup
    with pytest.warns(MmdiagWarning) as caught:
        assert reg.names() == ["good_diag"]
    assert calls == ["test.group"]
    assert reg.get("good_diag") is GoodDiag and "good_diag" in reg and len(reg) == 1
    assert calls == ["test.group"]  # once
    assert set(reg.skipped) == {"missing", "not_a_diagnostic", "bad_metadata", "abstract", "other_name"}
    assert "No module named" in reg.skipped["missing"]
    assert "subclass of mmdiag.diagnostics.base.Diagnostic" in reg.skipped["not_a_diagnostic"]
    assert "figures must be a tuple" in reg.skipped["bad_metadata"]
    assert "does not implement compute" in reg.skipped["abstract"]
    assert "give both the same name" in reg.skipped["other_name"]
    text = " ".join(str(w.message) for w in caught)
    assert "skipped the diagnostic plug-in 'missing'" in text and "test.group" in text


def test_a_plugin_cannot_replace_a_builtin(monkeypatch) -> None:
    reg, _ = fake_registry(monkeypatch, FakeEntryPoint("good_diag", GoodDiag))

    @dataclass(frozen=True)
    class Impostor(GoodDiag):
        """Same name, other class."""

    reg.register()(GoodDiag)
    monkeypatch.setattr("mmdiag.registry.metadata.entry_points", lambda group: [FakeEntryPoint("good_diag", Impostor)])
    with pytest.warns(MmdiagWarning, match="registered twice"):
        assert reg.get("good_diag") is GoodDiag


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'shapley'"):
        DIAGNOSTICS.get("shapely")
    with pytest.raises(ConfigError, match="Did you mean 'ogm_ge'"):
        FIXES.get("ogm_gee")


def test_the_registries_read_the_documented_entry_point_groups() -> None:
    assert DIAGNOSTICS.group == "mmdiag.diagnostics" and FIXES.group == "mmdiag.fixes"
    for cls in DIAGNOSTICS.classes():
        check_plugin_class(cls, Diagnostic)  # the built-ins pass the check a plug-in must pass
    for cls in FIXES.classes():
        check_plugin_class(cls, Fix)
