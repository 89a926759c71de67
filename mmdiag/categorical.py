"""categorical: modalities of category indices (token ids, categorical columns) fed to embeddings.

A modality whose tensor has an integer (or bool) dtype holds category indices, not measurements:
adding Gaussian noise to it, interpolating it or filling it with a mean makes no sense (and an
``nn.Embedding`` raises on the result). mmdiag treats such a modality as follows:

* **Masking at the input** fills it with one stated index (``ModelAdapter.mask_index``, 0 by
  default); ``mean`` and ``noise`` masks are refused there (:func:`categorical_baseline`). Masking at
  the feature level is unaffected: encoder outputs are floats.
* **Noise (udml)** is categorical corruption (:func:`corrupt_categorical`): at noise level l each
  index is replaced, independently with probability :func:`corruption_rate`, by a value drawn from
  the values observed at the same position in the data.
* **Integrated Gradients** runs at the encoder outputs (:func:`attribution_path`): the straight path
  goes from the features of the "all modalities absent" state to the real features. Without known
  encoders the attribution evidence is unavailable (a skip, with the reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.tensors import map_tensors, tensor_leaves

if TYPE_CHECKING:  # the adapter imports this module
    from mmdiag.adapter import ModelAdapter

#: rows of observed values kept per categorical modality; corruption draws its replacements there.
DONOR_ROWS = 1024


def is_categorical(t: Tensor) -> bool:
    """Whether a modality tensor holds category indices (an integer or bool dtype)."""
    return not (t.dtype.is_floating_point or t.dtype.is_complex)


def categorical_modalities(inputs: Mapping[str, Tensor], modalities: Sequence[str]) -> list[str]:
    """The modalities of ``inputs`` whose tensors hold category indices, in ``modalities`` order."""
    return [m for m in modalities if is_categorical(inputs[m])]


def check_mask_index(index: Any) -> int:
    """The mask index, validated: an integer >= 0 (a row of an embedding table)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(
            "The mask index (the category that fills an absent integer modality at the input) must "
            f"be an integer >= 0, a valid row of the modality's embedding table; found {index!r}. "
            "Use 0 (the default) or the index of your padding or unknown token."
        )
    return index


def categorical_baseline(value: Tensor, m: str, mask: str, index: int) -> Tensor:
    """The input-level masking baseline of categorical modality ``m``: every element = ``index``.

    ``mean`` and ``noise`` masks would invent categories that do not exist (a fractional or
    random id): they are refused with a ConfigError.
    """
    if mask != "zero":
        raise ConfigError(
            f"Modality {m!r} holds integer category indices ({str(value.dtype).replace('torch.', '')}), "
            f"and integer modalities are masked at the input with an index, not with a {mask} value; "
            f"found `mask={mask!r}` with input-level masking (`mask_at='input'`, or the fallback to it "
            f"recorded in the report's warnings). Use `mask='zero'` (masks {m!r} with index {index}) or "
            "feature-level masking (`mask_at='feature'` with `encoders={MODALITY: MODULE}`: encoder outputs "
            "are floats and take any mask)."
        )
    return torch.full_like(value, index)


def corruption_rate(level: int, step: float) -> float:
    """Probability that categorical corruption at noise ``level`` replaces an index.

    A float modality at level l gets Gaussian noise of std f = step * (l - 1) data stds, which
    leaves a correlation of 1 / sqrt(1 + f^2) between the clean and the noisy value. An index
    replaced with probability r by an independent draw from the data's own values keeps a
    correlation of 1 - r with the clean one (for the indicator of each category), so the rate that
    destroys as much of the signal as the float noise does is r = 1 - 1 / sqrt(1 + f^2): 0 at
    level 1 (clean), growing with the level and below 1 (0.29 at f = 1, 0.55 at f = 2, the top of
    the default grid), so every level of the grid stays distinct. Capped at 1.
    """
    f = float(step) * (int(level) - 1)
    if f <= 0:
        return 0.0
    return min(1.0, 1.0 - 1.0 / math.sqrt(1.0 + f * f))


def add_donors(pool: Tensor | None, x: Tensor, cap: int = DONOR_ROWS) -> Tensor:
    """The donor rows after seeing ``x``: the first ``cap`` rows seen, of one shape and dtype.

    A batch whose per-row shape or dtype differs from the pool's (sequences padded to another
    length) starts a new pool from its own rows.
    """
    if pool is None or pool.shape[1:] != x.shape[1:] or pool.dtype != x.dtype or pool.device != x.device:
        return x[:cap].clone()
    if pool.shape[0] >= cap:
        return pool
    return torch.cat([pool, x[: cap - pool.shape[0]]])


def corrupt_categorical(x: Tensor, rate: float, generator: torch.Generator | None = None,
                        donors: Tensor | None = None) -> Tensor:
    """``x`` with each index replaced, independently with probability ``rate``, by an observed value.

    The replacement of element (i, pos) is ``donors[j, pos]`` for a row j drawn uniformly: a draw
    from the empirical distribution of the values seen at that position (``donors`` defaults to
    ``x`` itself). Drawing per position keeps every replacement valid for the position's own
    vocabulary (categorical columns with separate embedding tables). A replacement may equal the
    original value, so the share of changed elements is ``rate`` times the chance of a different
    draw. Random numbers come from ``generator`` (CPU), so the result is fixed by its seed.
    """
    if rate <= 0 or x.numel() == 0:
        return x.clone()
    pool = x if donors is None else donors
    if pool.shape[1:] != x.shape[1:] or pool.shape[0] == 0:
        raise EvidenceError(
            f"Categorical corruption needs donor rows shaped like the corrupted rows; expected "
            f"[n, {', '.join(map(str, x.shape[1:]))}], found {list(pool.shape)}."
        )
    replace = torch.rand(x.shape, generator=generator) < rate
    rows = torch.randint(0, pool.shape[0], x.shape, generator=generator)
    drawn = pool.gather(0, rows.to(pool.device)).to(x.device)
    return torch.where(replace.to(x.device), drawn, x)


def unattributable_reason(modalities: Sequence[str], inputs: Mapping[str, Tensor]) -> str:
    """Why Integrated Gradients cannot run on the inputs of a black-box model with categorical modalities."""
    named = ", ".join(f"{m!r} ({str(inputs[m].dtype).replace('torch.', '')})" for m in modalities)
    return (
        f"integer inputs cannot be attributed at the input: {named} holds category indices, which "
        "have no straight path from a baseline to interpolate along. mmdiag attributes such a "
        "modality at its encoder's output instead, which needs the encoder of each modality: name "
        "them with `encoders={MODALITY: MODULE}`"
    )


def check_categorical(adapter: ModelAdapter, sample: Mapping[str, Tensor], wanted: set[str]) -> dict[str, str]:
    """Settle how categorical modalities are handled, once the data's dtypes are known.

    Refuses ``mean``/``noise`` masks at the input level for a categorical modality (ConfigError,
    raised by the adapter's masking), records in the adapter's notes how categorical modalities
    are masked, corrupted and attributed, and returns ``{kind: reason}`` for the evidence kinds in
    ``wanted`` that this setup rules out (attribution of a black-box model): skips, not errors.
    """
    ints = categorical_modalities(sample, adapter.modalities)
    if not ints:
        return {}
    names = ", ".join(ints)
    if adapter.mask_at == "input":
        one = {m: t[:1] for m, t in sample.items()}
        adapter.masked_inputs(one, [], torch.Generator().manual_seed(0))  # raises for mean/noise
        _note(adapter, f"absent categorical modalities ({names}) are filled with index {adapter.mask_index} "
                       "(the mask index)")
    if "noise_features" in wanted and adapter.has_encoders:
        _note(adapter, f"udml corrupts categorical modalities ({names}) by replacing indices with values "
                       "observed in the data (categorical corruption) instead of adding Gaussian noise")
    if "attribution" not in wanted:
        return {}
    if not adapter.has_encoders:
        return {"attribution": unattributable_reason(ints, sample)}
    _note(adapter, "attribution runs Integrated Gradients at the encoder outputs, because categorical "
                   f"modalities ({names}) cannot be interpolated at the input")
    return {}


def _note(adapter: ModelAdapter, text: str) -> None:
    if text not in adapter.notes:  # an adapter reused for a second pass (probe data) notes it once
        adapter.notes.append(text)


@dataclass
class AttributionPath:
    """The straight Integrated-Gradients path: where it starts and ends, and what to run along it.

    ``at`` is ``input`` or ``encoder_output``; ``inputs`` and ``baselines`` are tensors with the
    batch first; ``extra`` is passed after them to ``forward`` (captum repeats it along the steps);
    ``owner[k]`` is the modality index of ``inputs[k]`` (a modality whose encoder returns several
    tensors owns several).
    """

    inputs: tuple[Tensor, ...]
    baselines: tuple[Tensor, ...]
    extra: tuple[Tensor, ...] | None
    forward: Callable[..., Tensor]
    owner: list[int]
    at: str

    def per_modality(self, attrs: Sequence[Tensor], absolute: bool) -> Tensor:
        """[b, M] sum over each modality's attribution elements (of |attribution| when ``absolute``)."""
        count = max(self.owner) + 1
        out = torch.zeros(attrs[0].shape[0], count, dtype=attrs[0].dtype, device=attrs[0].device)
        for k, t in zip(self.owner, attrs):
            t = t.detach().reshape(t.shape[0], -1)
            out[:, k] += (t.abs() if absolute else t).sum(1)
        return out

    def take(self, rows: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...] | None]:
        """(inputs, baselines, extra) of the given rows."""
        def pick(ts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(t[rows.to(t.device)] for t in ts)
        return pick(self.inputs), pick(self.baselines), None if self.extra is None else pick(self.extra)


def _leaves(structure: Any, m: str) -> list[Tensor]:
    found = tensor_leaves(structure)
    bad = [t.dtype for t in found if not t.dtype.is_floating_point]
    if bad or not found:
        raise EvidenceError(
            f"Integrated Gradients at the encoder output of {m!r} needs floating-point tensors; the "
            f"encoder returned {', '.join(str(d) for d in bad) or 'no tensor'}. Name an encoder "
            "module whose output is the float feature (e.g. the embedding) as its `encoders` entry."
        )
    return found


def attribution_path(adapter: ModelAdapter, inputs: Mapping[str, Tensor],
                     generator: torch.Generator | None) -> AttributionPath:
    """The Integrated-Gradients path of one batch, at the inputs or at the encoder outputs.

    All-float inputs: from the input-level masking baseline to the inputs (every modality).
    A categorical modality: every modality is attributed at its encoder's output, from the
    features of the "all absent" state (the masked features with feature-level masking, the
    encoder outputs of the masked inputs with input-level masking: both give ``subsets[0]``) to the
    real features; one joint path, so completeness (sum of attributions = f(x) - f(baseline))
    holds over all modalities. Without known encoders that is an EvidenceError with the reason.
    """
    a = adapter
    ints = categorical_modalities(inputs, a.modalities)
    if not ints:
        base = a.masked_inputs(inputs, [], generator)

        def call(*tensors: Tensor) -> Tensor:
            return a.call_model(dict(zip(a.modalities, tensors)))

        return AttributionPath(tuple(inputs[m].float() for m in a.modalities),
                               tuple(base[m].float() for m in a.modalities), None, call,
                               list(range(len(a.modalities))), "input")
    if not a.has_encoders:
        raise EvidenceError(unattributable_reason(ints, inputs))
    with torch.no_grad():
        _, feats = a.encode(inputs)
        if a.mask_at == "feature":
            absent = a.masked_features(feats, [], generator)
        else:
            _, absent = a.encode(a.masked_inputs(inputs, [], generator))
    xs: list[Tensor] = []
    bs: list[Tensor] = []
    owner: list[int] = []
    for j, m in enumerate(a.modalities):
        leaves = _leaves(feats[m], m)
        xs += [t.detach() for t in leaves]
        bs += [t.detach() for t in _leaves(absent[m], m)]
        owner += [j] * len(leaves)
    n_feat = len(xs)

    def head(*args: Tensor) -> Tensor:
        it = iter(args[:n_feat])
        replaced = {m: map_tensors(lambda _t: next(it), feats[m]) for m in a.modalities}
        return a.head_forward(dict(zip(a.modalities, args[n_feat:])), replaced)

    raw = tuple(inputs[m] for m in a.modalities)
    return AttributionPath(tuple(xs), tuple(bs), raw, head, owner, "encoder_output")
