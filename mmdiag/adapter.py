"""ModelAdapter: drive any multimodal classifier the same way.

The adapter knows the modality names, how to call the user's model (one dict argument, keyword
arguments named like the modalities, or positional tensors), how to run it with only a subset of
modalities present, and, when each modality's encoder submodule is known, how to read and replace
the encoders' outputs.

Masking a modality ("making it absent") replaces it with a baseline value:

* ``zero``: zeros;
* ``mean``: the dataset mean (per element), estimated on a pass over the data;
* ``noise``: Gaussian noise with the data's per-element mean and standard deviation.

It happens at the **input** (the raw tensor of the modality is replaced and the whole network runs)
or at the **feature** level (the output of the modality's encoder is replaced). Feature-level
masking is used by default when encoders are known, because it lets all 2^M subsets be evaluated
from one encoder pass: the encoders are temporarily swapped for stubs that return cached (or
masked) outputs, so each extra subset costs only what the model does after its encoders (the
fusion and head). This works for any fusion (concat, sum, gating, FiLM, attention) as long as each
modality reaches the rest of the network only through its encoder; :meth:`ModelAdapter.verify`
checks that on a real batch and the adapter falls back to input masking, with the reason recorded,
when it does not hold.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from mmdiag.categorical import categorical_baseline, check_mask_index, is_categorical
from mmdiag.detect import (  # noqa: F401 - re-exported: the adapter is where users look for them
    CallStyle,
    detect_call_style,
    find_encoders,
    find_head,
    find_module,
    search_encoders,
    unwrap,
)
from mmdiag.errors import AdapterError, ConfigError, EvidenceError, MmdiagError, user_code_error, user_frame
from mmdiag.pooling import Layout, check_mode, pool, record_layers
from mmdiag.replay import replay_mismatch
from mmdiag.tensors import (  # noqa: F401 - re-exported
    as_class_logits,
    clone_tree,
    first_tensor,
    leaf_key,
    logits_of,
    map_leaves_indexed,
    map_tensors,
    tensor_leaves,
    unsupported_container,
)

MaskKind = Literal["zero", "mean", "noise"]
MaskAt = Literal["input", "feature"]

CALL_STYLES: tuple[str, ...] = ("dict", "kwargs", "positional")
MASK_KINDS: tuple[str, ...] = ("zero", "mean", "noise")
MASK_LEVELS: tuple[str, ...] = ("input", "feature")

#: Exceptions from the user's forward that mean "the data or the call convention does not fit".
_FIT_ERRORS = (TypeError, RuntimeError, ValueError, IndexError, KeyError)


class EncoderCallError(AdapterError):
    """A named encoder did not run exactly once in a forward, so its output cannot be replayed."""


class _Stub(nn.Module):
    """Stands in for an encoder and returns a fixed output (a cached or masked feature).

    Each call returns a fresh copy, so a model that fuses in place writes into the copy, never into
    the features the adapter keeps (and the next replay starts from the same values).
    """

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.hold(value)

    def hold(self, value: Any) -> None:
        """Return ``value`` from now on. Written into ``__dict__``:
        ``nn.Module.__setattr__`` checks every assignment against parameters, buffers and
        submodules, and stubs are re-armed M times per head call (a tenth of a plain pass of the
        whole analysis at four modalities went there)."""
        self.__dict__["value"] = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return clone_tree(self.value)


@dataclass
class MaskStats:
    """Per-element mean and standard deviation of each modality (inputs or encoder outputs)."""

    mean: dict[str, Any] = field(default_factory=dict)
    std: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelAdapter:
    """Drives one multimodal classifier for diagnosis and retraining.

    Args:
        model: the user's ``nn.Module`` (wrappers such as DDP are unwrapped for module lookups).
        modalities: modality names, in the order positional inputs take them.
        call: ``dict``, ``kwargs`` or ``positional``; detected from ``forward``'s signature if None.
        encoders: modality -> dotted submodule name of its encoder; found from module names if None.
        head: dotted name of the fusion head (used for the linear concat-head split); found if None.
        mask: how an absent modality is filled: ``zero``, ``mean`` or ``noise`` (an integer input: ``mask_index``).
        mask_at: ``feature`` (encoder outputs; default when encoders are known) or ``input``.
        seed: seeds the noise mask.
        pool_mode: how encoder outputs of rank 3 and more become one vector per sample for the
            feature diagnostics: ``mean``, ``first`` or ``flatten`` (see :mod:`mmdiag.pooling`).

    After :meth:`verify`, ``warnings`` holds every change of method (input instead of feature
    masking, a black-box run) with its cause, ``output_kind`` says how the logits were read
    (``multiclass`` or ``binary``) and ``layouts`` how each encoder output is pooled.
    """

    model: nn.Module
    modalities: tuple[str, ...]
    call: CallStyle | None = None
    encoders: dict[str, str] | None = None
    head: str | None = None
    mask: MaskKind = "zero"
    mask_at: MaskAt | None = None
    seed: int = 0
    mask_index: int = 0
    pool_mode: str = "mean"
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output_kind: str | None = None
    black_box_reason: str | None = None
    layouts: dict[str, Layout] = field(default_factory=dict)
    input_stats: MaskStats = field(default_factory=MaskStats)
    feature_stats: MaskStats = field(default_factory=MaskStats)
    #: when set, ``restorer(features, present)`` returns the features with the absent modalities
    #: restored from the present ones (see :mod:`mmdiag.deploy`); masked_features then uses it
    restorer: Callable[[Mapping[str, Any], Sequence[str]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if len(self.modalities) < 2:
            raise ConfigError(
                f"mmdiag compares modalities, so it needs at least 2; found {len(self.modalities)} "
                f"({', '.join(self.modalities) or 'none'}). Pass `modalities=[a, b]` (names of the data arrays)."
            )
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"Modality names must be unique; found {list(self.modalities)}.")
        if self.mask not in MASK_KINDS:
            raise ConfigError(f"`mask` must be one of {', '.join(MASK_KINDS)}; found {self.mask!r}.")
        check_mask_index(self.mask_index)
        if self.call is None:
            self.call = detect_call_style(self.model, self.modalities)
            self.notes.append(f"call convention detected from forward's signature: {self.call}")
        elif self.call not in CALL_STYLES:
            raise ConfigError(f"`call` must be one of {', '.join(CALL_STYLES)}; found {self.call!r}.")
        root = unwrap(self.model)
        if self.encoders is None:
            found, why = search_encoders(root, self.modalities)
            if found:
                self.encoders = found
                self.notes.append(
                    "encoders found from module names: " + ", ".join(f"{m}={n}" for m, n in found.items())
                )
            else:
                self.black_box_reason = (
                    f"the encoders were not found by name: {why} (name them with `encoders={{MODALITY: MODULE}}`)"
                )
                self.warnings.append(
                    f"the encoders were not found by name ({why}), so the model is driven as a "
                    "black box: absent modalities are masked at the input and the encoder-level "
                    "diagnostics are skipped. Name each modality's encoder (`encoders={MODALITY: MODULE}`) "
                    "to mask at the encoder output."
                )
        else:
            unknown = [m for m in self.encoders if m not in self.modalities]
            if unknown:
                raise ConfigError(
                    f"`encoders` names modality {unknown[0]!r}, which is not among the modalities "
                    f"{', '.join(self.modalities)}."
                )
            missing = [m for m in self.modalities if m not in self.encoders]
            if missing:
                raise ConfigError(
                    f"`encoders` must name an encoder for every modality; missing: {', '.join(missing)}."
                )
            for name in self.encoders.values():
                find_module(root, name)
            shared = sorted({n for n in self.encoders.values() if list(self.encoders.values()).count(n) > 1})
            if shared:
                self._give_up_encoders(
                    f"the encoder {shared[0]!r} is named for several modalities, so its output cannot "
                    "be replaced for one modality alone"
                )
        check_mode(self.pool_mode)
        if self.head is None:
            self.head = find_head(root, self.encoders)
        else:
            find_module(root, self.head)
        if self.mask_at is None:
            self.mask_at = "feature" if self.encoders else "input"
        elif self.mask_at not in MASK_LEVELS:
            raise ConfigError(f"`mask_at` must be input or feature; found {self.mask_at!r}.")
        elif self.mask_at == "feature" and not self.encoders:
            raise ConfigError(
                "`mask_at='feature'` needs the encoder of each modality; name them with "
                "`encoders={MODALITY: MODULE}` or use `mask_at='input'`."
            )

    # ------------------------------------------------------------------ calling the model
    @property
    def has_encoders(self) -> bool:
        """Whether encoder-level diagnostics (features, feature gradients) can run."""
        return bool(self.encoders)

    def call_model(self, inputs: Mapping[str, Tensor], rows: int | None = None) -> Tensor:
        """Run the model on a batch of modality tensors; returns validated class logits [B, C]
        (B = ``rows``, by default the inputs' batch size).

        A binary classifier's single logit ([B] or [B, 1]) is returned as the two-class logits
        [0, z] (see :func:`mmdiag.tensors.as_class_logits`). An exception raised by the model's
        forward becomes an error that keeps the model's own message and names the file and line
        where it was raised; errors that usually mean a misfit of data and model (type, shape,
        index errors) also show the call convention and the input shapes.
        """
        try:
            if self.call == "dict":
                out = self.model({m: inputs[m] for m in self.modalities})
            elif self.call == "kwargs":
                out = self.model(**{m: inputs[m] for m in self.modalities})
            else:
                out = self.model(*[inputs[m] for m in self.modalities])
        except MmdiagError:
            raise
        except _FIT_ERRORS as exc:
            shapes = ", ".join(f"{m}={tuple(inputs[m].shape)}:{str(inputs[m].dtype).replace('torch.', '')}"
                               for m in self.modalities)
            where = user_frame(exc)
            at = f" at {where[0]}:{where[1]}" if where else ""
            raise AdapterError(
                f"The model's forward raised {type(exc).__name__}{at}: {exc}. It was called with "
                f"{self.call} inputs ({shapes}). Check the modality names and order, the call "
                "convention (`call=dict|kwargs|positional`), and that the data has the shapes the model expects."
            ) from exc
        except Exception as exc:  # noqa: BLE001 - the user's own checks (AssertionError, custom errors)
            raise user_code_error(exc, "running the model's forward") from exc
        batch = next(iter(inputs.values())).shape[0] if rows is None else rows
        logits, kind = as_class_logits(logits_of(out), batch)
        if self.output_kind is None:
            self.output_kind = kind
            if kind == "binary":
                self.notes.append(
                    "the model returns one logit per sample: read as a binary classifier (class 1 when "
                    "the logit is above 0), with two-class logits [0, z]"
                )
        return logits

    def _module(self, name: str) -> nn.Module:
        """Submodule by dotted name, from a lookup table built once (encoders are swapped for
        stubs and back many times per batch; walking ``named_modules()`` each time is costly)."""
        cache = self.__dict__.get("_module_cache")
        if cache is None or cache[0] is not self.model:
            cache = (self.model, dict(unwrap(self.model).named_modules()))
            self.__dict__["_module_cache"] = cache
        if name not in cache[1]:
            return find_module(unwrap(self.model), name)  # raises with the closest name
        return cache[1][name]

    def encoder_module(self, m: str) -> nn.Module:
        """The encoder submodule of modality ``m``."""
        if not self.encoders:
            raise AdapterError("No encoders are known for this model.")
        return self._module(self.encoders[m])

    @contextlib.contextmanager
    def _swapped(self, replacements: Mapping[str, Any]) -> Iterator[dict[str, _Stub]]:
        """Temporarily replace encoder submodules by stubs returning the given outputs."""
        stubs: dict[str, _Stub] = {}
        originals: list[tuple[nn.Module, str, nn.Module]] = []
        # Stubs are pooled and reused: building an nn.Module costs about as much as a small fusion
        # head's forward, and training fixes call the head several times a step. A pool (not one
        # stub per modality) keeps nested calls apart.
        pool = self.__dict__.setdefault("_stub_pool", [])
        try:
            for m, value in replacements.items():
                parent, child = self._encoder_slot(m)
                originals.append((parent, child, parent._modules[child]))
                stubs[m] = pool.pop() if pool else _Stub(None)
                stubs[m].hold(value)
                parent._modules[child] = stubs[m]
            yield stubs
        finally:
            for parent, child, module in reversed(originals):
                parent._modules[child] = module
            for stub in stubs.values():
                stub.hold(None)  # hold no features (or their graph) between calls
                pool.append(stub)

    def _encoder_slot(self, m: str) -> tuple[nn.Module, str]:
        """(parent module, attribute name) of modality ``m``'s encoder."""
        path = self.encoders[m]  # type: ignore[index]
        parent_path, _, child = path.rpartition(".")
        return (self._module(parent_path) if parent_path else unwrap(self.model)), child

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, Any]]:
        """Record each encoder's output during a forward (filled as encoders run).

        The hook keeps the encoder's own output and hands the rest of the model a copy, so a
        model that fuses in place changes the copy, never the recorded features; gradients of the
        model's logits still reach the recorded tensors (the copy is their child in the graph).
        ``captured["__calls__"]`` counts the calls of each encoder.
        """
        captured: dict[str, Any] = {}
        calls: dict[str, int] = {m: 0 for m in self.modalities}
        handles = []
        try:
            for m in self.modalities:
                def hook(_mod: nn.Module, _inp: Any, out: Any, m: str = m) -> Any:
                    calls[m] += 1
                    captured[m] = out
                    return clone_tree(out)
                handles.append(self.encoder_module(m).register_forward_hook(hook))
            captured["__calls__"] = calls
            yield captured
        finally:
            for h in handles:
                h.remove()

    def encode(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        """One full forward; returns the fused logits and every encoder's (unpooled) output."""
        with self.capture() as captured:
            logits = self.call_model(inputs)
        calls = captured.pop("__calls__")
        missing = [m for m in self.modalities if not calls[m]]
        if missing:
            raise EncoderCallError(
                f"the encoder of {', '.join(missing)} ({', '.join(self.encoders[m] for m in missing)}) "  # type: ignore[index]
                "was not called during forward: it is not the module that encodes that modality."
            )
        repeated = [m for m in self.modalities if calls[m] > 1]
        if repeated:
            m = repeated[0]
            raise EncoderCallError(
                f"the encoder of {m} ({self.encoders[m]}) ran {calls[m]} times in one forward (shared "  # type: ignore[index]
                "between modalities, or applied more than once), so its output cannot be replaced for "
                f"{m} alone"
            )
        return logits, dict(captured)

    def head_forward(self, inputs: Mapping[str, Tensor], features: Mapping[str, Any], rows: int | None = None) -> Tensor:
        """Logits from given encoder outputs: encoders are stubbed, only fusion and head run.

        ``inputs`` is still passed to the model (its forward signature needs it) but the stubs
        ignore it. Gradients flow into ``features``. ``rows``: the logits' batch size when the
        features hold another number of rows than the inputs (several feature sets stacked).
        """
        with self._swapped(features):
            return self.call_model(inputs, rows)

    # ------------------------------------------------------------------ masking
    def _baseline_like(self, value: Tensor, stats: MaskStats, m: str, generator: torch.Generator | None, at: str = "feature") -> Tensor:
        if at == "input" and is_categorical(value):  # category indices: one stated index (mmdiag.categorical)
            return categorical_baseline(value, m, self.mask, self.mask_index)
        if self.mask == "zero":
            return torch.zeros_like(value)
        if m not in stats.mean:  # never a silent zero in place of the stated mask
            raise EvidenceError(
                f"The `{self.mask}` mask replaces an absent modality with its data's statistics, but none were "
                f"estimated for the {at} values of {m!r}. Estimate them first "
                "(`mmdiag.runtime.mask_stats.estimate_mask_stats(adapter, batches, max_rows)`), or use the `zero` mask."
            )
        mean = torch.as_tensor(stats.mean[m], dtype=value.dtype, device=value.device).expand_as(value)
        if self.mask == "mean" or not value.dtype.is_floating_point:
            # an integer tensor inside an encoder output cannot carry Gaussian noise: the rounded mean
            return mean.clone()
        std = torch.as_tensor(stats.std[m], dtype=value.dtype, device=value.device).expand_as(value)
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype, device="cpu").to(value.device)
        return mean + std * noise

    def masked_inputs(
        self, inputs: Mapping[str, Tensor], present: Sequence[str], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The batch with every modality not in ``present`` replaced by its input-level baseline."""
        return {
            m: (inputs[m] if m in present else self._baseline_like(inputs[m], self.input_stats, m, generator, "input"))
            for m in self.modalities
        }

    def masked_features(
        self, features: Mapping[str, Any], present: Sequence[str], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Encoder outputs with every modality not in ``present`` replaced by its feature-level baseline
        (restored from the present ones instead when a ``restorer`` is set and some modality is present)."""
        if self.restorer is not None and len(present) > 0:
            return self.restorer(features, tuple(present))
        out: dict[str, Any] = {}
        for m in self.modalities:
            if m in present:
                out[m] = features[m]
            else:
                # one statistic per tensor of a structured encoder output (see MomentSums.add)
                out[m] = map_leaves_indexed(
                    lambda t, i, m=m: self._baseline_like(t, self.feature_stats, leaf_key(m, i), generator),
                    features[m])
        return out

    def subset_logits(
        self,
        inputs: Mapping[str, Tensor],
        present: Sequence[str],
        features: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Logits with only the modalities in ``present`` present, masked at the adapter's level."""
        if self.mask_at == "feature":
            if features is None:
                _, features = self.encode(inputs)
            return self.head_forward(inputs, self.masked_features(features, present, generator))
        return self.call_model(self.masked_inputs(inputs, present, generator))

    def needs_stats(self) -> bool:
        """Whether the mask needs the data's mean/std (``mean`` and ``noise`` masks)."""
        return self.mask in ("mean", "noise")

    def describe(self) -> dict[str, Any]:
        """JSON-safe description of how the model is driven (goes into the report settings)."""
        return {
            "modalities": list(self.modalities),
            "call": self.call,
            "encoders": dict(self.encoders) if self.encoders else None,
            "head": self.head,
            "mask": self.mask,
            "mask_at": self.mask_at,
            "output": self.output_kind,
            "pooling": {m: lay.describe(self.pool_mode) for m, lay in self.layouts.items()} or None,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }

    def pooled(self, m: str, feature: Any) -> Tensor:
        """Modality ``m``'s encoder output as one vector per sample (see :mod:`mmdiag.pooling`)."""
        return pool(feature, self.layouts.get(m), self.pool_mode)

    def _give_up_encoders(self, reason: str) -> None:
        """Fall back to input masking (a change of method: recorded as a warning with its cause)."""
        self.warnings.append(
            f"feature-level masking is not exact for this model: {reason}. Absent modalities are "
            "masked at the input instead, and the encoder-level diagnostics are skipped. To mask at "
            "the encoder output, name as each modality's encoder (`encoders={MODALITY: MODULE}`) a "
            "module that runs once per forward and is that modality's only path to the fusion."
        )
        self.black_box_reason = f"feature-level masking was given up: {reason}"
        self.encoders = None
        self.mask_at = "input"
        self.layouts = {}

    def _encode_recording(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Any], dict[str, Any]]:
        """:meth:`encode`, also recording the layers that ran inside each encoder (for the layouts)."""
        with contextlib.ExitStack() as stack:
            layers = {m: stack.enter_context(record_layers(self.encoder_module(m))) for m in self.modalities}
            logits, feats = self.encode(inputs)
        return logits, feats, layers

    def verify(self, inputs: Mapping[str, Tensor], atol: float = 1e-4) -> None:
        """Check the adapter against one real batch, falling back to input masking if needed.

        Runs the model once (validating the logits). When encoders are known, checks that replaying
        the captured encoder outputs is exact (see :func:`mmdiag.replay.replay_mismatch`); if it is not (an
        encoder shared or reused, a modality that bypasses its encoder, an output mmdiag cannot
        rebuild), feature-level masking would give wrong numbers: the adapter switches to input
        masking and records why in ``warnings``.
        """
        with torch.no_grad():
            if not self.encoders:
                self.call_model(inputs)
                return
            try:
                reason = replay_mismatch(self, inputs, atol)
            except EncoderCallError as exc:
                reason = str(exc).rstrip(".")
            if reason:
                self._give_up_encoders(reason)
                self.call_model(inputs)
