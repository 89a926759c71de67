"""The settings that several entry points share, one frozen dataclass each.

* :class:`AdapterSpec` -- how to drive the user's model (modalities, call convention, encoders, head,
  masking); :meth:`AdapterSpec.build` makes the :class:`~mmdiag.adapter.ModelAdapter`.
* :class:`AnalysisSpec` -- what to diagnose and how (diagnostic selection and parameters, bootstrap,
  seed, collection settings, verdict thresholds).
* :class:`TrainSpec` -- the training budget of :func:`mmdiag.train.fit` (epochs, optimizer and its
  knobs, batch size, seed, device, gradient clipping).

:func:`mmdiag.api.analyze_with`, :func:`mmdiag.train.fit`, :func:`mmdiag.rebalance.rebalance` and
the command line (which builds them from its resolved options) take these instead of repeating the
same long parameter lists. A spec checks its values when it is made (ConfigError).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings
from mmdiag.errors import ConfigError
from mmdiag.validation import BOOTSTRAP, SEED
from mmdiag.verdict import VerdictThresholds

__all__ = ["OPTIMIZERS", "AdapterSpec", "AnalysisSpec", "TrainSpec"]

#: Optimizer names a :class:`TrainSpec` accepts.
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class AdapterSpec:
    """How to drive the user's model (see :class:`~mmdiag.adapter.ModelAdapter` for each field).

    Attributes:
        modalities: names in positional order; None: inferred from the data.
        call: ``dict``, ``kwargs`` or ``positional``; None: detected from ``forward``'s signature.
        encoders: modality -> dotted submodule name of its encoder; None (or empty): found by name.
        head: dotted name of the fusion head; None: found.
        mask: ``zero``, ``mean`` or ``noise``; mask_at: ``feature``, ``input`` or None (feature when
            the encoders are known); mask_index: the index an integer input is masked with.
    """

    modalities: tuple[str, ...] | None = None
    call: str | None = None
    encoders: Mapping[str, str] | None = None
    head: str | None = None
    mask: str = "zero"
    mask_at: str | None = None
    mask_index: int = 0

    def __post_init__(self) -> None:
        if self.modalities is not None:
            object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "encoders", dict(self.encoders) if self.encoders else None)

    def with_modalities(self, modalities: Sequence[str]) -> "AdapterSpec":
        """The same spec with ``modalities`` set."""
        return dataclasses.replace(self, modalities=tuple(modalities))

    def build(self, model: nn.Module, seed: int = 0) -> ModelAdapter:
        """The :class:`ModelAdapter` for ``model`` (``seed`` seeds the noise mask)."""
        if self.modalities is None:
            raise ConfigError("Cannot build an adapter without modalities; pass `modalities=[a, b]`.")
        return ModelAdapter(model, self.modalities, call=self.call,  # type: ignore[arg-type]
                            encoders=dict(self.encoders) if self.encoders else None, head=self.head,
                            mask=self.mask, mask_at=self.mask_at, mask_index=self.mask_index,  # type: ignore[arg-type]
                            seed=seed)


@dataclass(frozen=True)
class AnalysisSpec:
    """What to diagnose and how.

    Attributes:
        only, skip: diagnostic selection (None: the default suite).
        params: diagnostic name -> parameter overrides.
        bootstrap: bootstrap resamples of the 95% intervals (0: none); seed: the seed of everything random.
        collect: batch size, device and sampling caps of the evidence collection (its own seed is
            replaced by ``seed``); None: the defaults.
        thresholds: verdict thresholds; None: the defaults.
    """

    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None
    params: Mapping[str, Mapping[str, Any]] | None = None
    bootstrap: int = 1000
    seed: int = 0
    collect: CollectSettings | None = None
    thresholds: VerdictThresholds | None = None

    def __post_init__(self) -> None:
        BOOTSTRAP.check(self.bootstrap, "bootstrap")
        SEED.check(self.seed, "seed")
        for name in ("only", "skip"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.params is not None:
            object.__setattr__(self, "params", {k: dict(v) for k, v in self.params.items()})

    def collect_settings(self, seed_offset: int = 0) -> CollectSettings:
        """The collection settings with ``seed + seed_offset`` as their seed."""
        cs = self.collect or CollectSettings()
        return CollectSettings(**{**cs.__dict__, "seed": self.seed + seed_offset})


@dataclass(frozen=True)
class TrainSpec:
    """The training budget of :func:`mmdiag.train.fit` (per process under torchrun).

    Attributes:
        epochs: planned epochs (>= 0).
        optimizer: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``; lr (> 0) and weight_decay (>= 0).
        batch_size: training batch size; eval_batch_size: validation batch size.
        seed: seeds the global generators, the data order and the evaluation masks.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun: ``cuda:LOCAL_RANK``).
        grad_clip: clip the global gradient norm (after the fix's ``after_backward``) to this value.
    """

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 64
    seed: int = 0
    device: str | torch.device = "auto"
    grad_clip: float | None = None
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if int(self.epochs) < 0:
            raise ConfigError(f"epochs must be >= 0; found {self.epochs}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; found {self.optimizer!r}.")
        if not (float(self.lr) > 0):
            raise ConfigError(f"lr must be positive; found {self.lr}.")
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be at least 1; found {self.batch_size}.")
        if float(self.weight_decay) < 0:
            raise ConfigError(f"weight_decay must be >= 0; found {self.weight_decay}.")
        if self.grad_clip is not None and not float(self.grad_clip) > 0:
            raise ConfigError(f"grad_clip must be positive; found {self.grad_clip}.")
        for name, kind in (("epochs", int), ("lr", float), ("weight_decay", float), ("momentum", float),
                           ("batch_size", int), ("seed", int), ("eval_batch_size", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.grad_clip is not None:
            object.__setattr__(self, "grad_clip", float(self.grad_clip))

    def replace(self, **changes: Any) -> "TrainSpec":
        """A copy with ``changes`` (field names only; TypeError for any other name)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"TrainSpec has no field {unknown[0]!r}; its fields are: {', '.join(sorted(known))}.")
        return dataclasses.replace(self, **changes)
