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
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from mmdiag.errors import AdapterError, ConfigError
from mmdiag.registry import closest

CallStyle = Literal["dict", "kwargs", "positional"]
MaskKind = Literal["zero", "mean", "noise"]
MaskAt = Literal["input", "feature"]

CALL_STYLES: tuple[str, ...] = ("dict", "kwargs", "positional")
MASK_KINDS: tuple[str, ...] = ("zero", "mean", "noise")
MASK_LEVELS: tuple[str, ...] = ("input", "feature")

# Names that a fusion head commonly goes by in research code, most specific first.
_HEAD_NAMES = ("fusion_head", "fusion_module", "fusion", "head", "classifier", "fc_out", "cls", "fc")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
        else:
            return model


def detect_call_style(model: nn.Module, modalities: Sequence[str]) -> CallStyle:
    """Guess how ``model.forward`` takes its inputs from its signature.

    Keyword style when every modality name is a parameter name; dict style when forward takes one
    parameter not named like a modality; positional otherwise (in the order of ``modalities``).
    """
    try:
        params = [
            p
            for p in inspect.signature(unwrap(model).forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    except (TypeError, ValueError):
        return "positional"
    names = [p.name for p in params]
    if all(m in names for m in modalities):
        return "kwargs"
    required = [p for p in params if p.default is p.empty]
    if len(required) == 1 and len(modalities) > 1:
        return "dict"
    return "positional"


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, a mapping or object with ``logits``, or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise AdapterError(
            f"The model returned a mapping with keys {sorted(map(str, output))}; expected a "
            "'logits' entry holding a [batch, classes] tensor. Return the logits, or a dict with 'logits'."
        )
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise AdapterError(
        f"The model returned {type(output).__name__}; expected a [batch, classes] logits tensor, "
        "a dict with 'logits', or a tuple whose first item is the logits."
    )


def find_module(root: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``; ConfigError with the closest name otherwise."""
    modules = dict(root.named_modules())
    if name not in modules:
        known = [n for n in modules if n]
        near = closest(name, known)
        hint = f" Did you mean {near!r}?" if near else ""
        raise ConfigError(
            f"The model has no submodule named {name!r}.{hint} Top-level submodules: "
            f"{', '.join(n for n, _ in root.named_children()) or '(none)'}."
        )
    return modules[name]


def find_encoders(root: nn.Module, modalities: Sequence[str]) -> dict[str, str] | None:
    """Encoder submodule names found from module names that contain the modality names.

    For each modality, the shallowest submodule whose own name (last path component) contains the
    modality name. Returns ``None`` unless every modality has exactly one such shallowest module
    and no module is claimed twice.
    """
    found: dict[str, str] = {}
    names = [n for n, _ in root.named_modules() if n]
    for m in modalities:
        hits = [n for n in names if m.lower() in n.rsplit(".", 1)[-1].lower()]
        if not hits:
            return None
        depth = min(h.count(".") for h in hits)
        top = [h for h in hits if h.count(".") == depth]
        if len(top) != 1:
            return None
        found[m] = top[0]
    if len(set(found.values())) != len(found):
        return None
    # A modality name that is a substring of another (e.g. "rgb" in "rgbd") must not claim the same
    # tree twice: no encoder may contain another.
    paths = list(found.values())
    for a in paths:
        for b in paths:
            if a != b and b.startswith(a + "."):
                return None
    return found


def find_head(root: nn.Module, encoders: Mapping[str, str] | None) -> str | None:
    """A fusion-head submodule by conventional name, outside the encoders, or ``None``."""
    children = dict(root.named_children())
    enc_roots = {e.split(".")[0] for e in (encoders or {}).values()}
    for name in _HEAD_NAMES:
        if name in children and name not in enc_roots:
            return name
    return None


class _Stub(nn.Module):
    """Stands in for an encoder and returns a fixed output (a cached or masked feature)."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.value


def map_tensors(fn: Any, obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, o) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(fn, o) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def first_tensor(obj: Any) -> Tensor:
    """The first tensor in a nested output (an encoder that returns a tuple, for instance)."""
    if isinstance(obj, Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for o in items:
        try:
            return first_tensor(o)
        except AdapterError:
            continue
    raise AdapterError(f"An encoder returned {type(obj).__name__} with no tensor in it.")


def pool(feature: Any) -> Tensor:
    """A per-sample vector from an encoder output: [B, D] kept; [B, C, ...] averaged over the trailing axes.

    The convention treats axis 1 as channels (CNN layout); a transformer's [B, T, D] output should
    be pooled by the encoder itself (return the CLS token or the mean) to get per-channel features.
    """
    t = first_tensor(feature)
    if t.dim() == 1:
        return t[:, None]
    if t.dim() == 2:
        return t
    return t.flatten(2).mean(dim=2)


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
        mask: how an absent modality is filled: ``zero``, ``mean`` or ``noise``.
        mask_at: ``feature`` (encoder outputs; default when encoders are known) or ``input``.
        seed: seeds the noise mask.
    """

    model: nn.Module
    modalities: tuple[str, ...]
    call: CallStyle | None = None
    encoders: dict[str, str] | None = None
    head: str | None = None
    mask: MaskKind = "zero"
    mask_at: MaskAt | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    input_stats: MaskStats = field(default_factory=MaskStats)
    feature_stats: MaskStats = field(default_factory=MaskStats)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if len(self.modalities) < 2:
            raise ConfigError(
                f"mmdiag compares modalities, so it needs at least 2; found {len(self.modalities)} "
                f"({', '.join(self.modalities) or 'none'}). Pass --modalities a,b (names of the data arrays)."
            )
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"Modality names must be unique; found {list(self.modalities)}.")
        if self.mask not in MASK_KINDS:
            raise ConfigError(f"--mask must be one of {', '.join(MASK_KINDS)}; found {self.mask!r}.")
        if self.call is None:
            self.call = detect_call_style(self.model, self.modalities)
            self.notes.append(f"call convention detected from forward's signature: {self.call}")
        elif self.call not in CALL_STYLES:
            raise ConfigError(f"--call must be one of {', '.join(CALL_STYLES)}; found {self.call!r}.")
        root = unwrap(self.model)
        if self.encoders is None:
            found = find_encoders(root, self.modalities)
            if found:
                self.encoders = found
                self.notes.append(
                    "encoders found from module names: " + ", ".join(f"{m}={n}" for m, n in found.items())
                )
            else:
                self.notes.append(
                    "no encoder submodule found for every modality (name them with --encoder "
                    "MODALITY=MODULE): the model is treated as a black box; encoder-level diagnostics are skipped"
                )
        else:
            unknown = [m for m in self.encoders if m not in self.modalities]
            if unknown:
                raise ConfigError(
                    f"--encoder names modality {unknown[0]!r}, which is not among the modalities "
                    f"{', '.join(self.modalities)}."
                )
            missing = [m for m in self.modalities if m not in self.encoders]
            if missing:
                raise ConfigError(
                    f"--encoder must name an encoder for every modality; missing: {', '.join(missing)}."
                )
            for name in self.encoders.values():
                find_module(root, name)
        if self.head is None:
            self.head = find_head(root, self.encoders)
        else:
            find_module(root, self.head)
        if self.mask_at is None:
            self.mask_at = "feature" if self.encoders else "input"
        elif self.mask_at not in MASK_LEVELS:
            raise ConfigError(f"--mask-at must be input or feature; found {self.mask_at!r}.")
        elif self.mask_at == "feature" and not self.encoders:
            raise ConfigError(
                "--mask-at feature needs the encoder of each modality; name them with --encoder "
                "MODALITY=MODULE or use --mask-at input."
            )

    # ------------------------------------------------------------------ calling the model
    @property
    def has_encoders(self) -> bool:
        """Whether encoder-level diagnostics (features, feature gradients) can run."""
        return bool(self.encoders)

    def call_model(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Run the model on a batch of modality tensors; returns validated logits [B, C].

        An exception raised by the model's forward becomes an :class:`AdapterError` that shows the
        call convention and the input shapes, because it almost always means the data or the
        convention does not fit the model.
        """
        try:
            if self.call == "dict":
                out = self.model({m: inputs[m] for m in self.modalities})
            elif self.call == "kwargs":
                out = self.model(**{m: inputs[m] for m in self.modalities})
            else:
                out = self.model(*[inputs[m] for m in self.modalities])
        except (TypeError, RuntimeError, ValueError, IndexError, KeyError) as exc:
            shapes = ", ".join(f"{m}={tuple(inputs[m].shape)}:{str(inputs[m].dtype).replace('torch.', '')}"
                               for m in self.modalities)
            raise AdapterError(
                f"The model's forward raised {type(exc).__name__}: {exc}. It was called with "
                f"{self.call} inputs ({shapes}). Check --modalities (names and order), --call "
                "dict|kwargs|positional, and that the data has the shapes the model expects."
            ) from exc
        logits = logits_of(out)
        batch = next(iter(inputs.values())).shape[0]
        if logits.dim() != 2 or logits.shape[0] != batch:
            raise AdapterError(
                f"The model's logits have shape {tuple(logits.shape)}; expected [batch={batch}, classes]. "
                "Check the forward convention (--call dict|kwargs|positional) and that the model returns "
                "class logits."
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
        root = unwrap(self.model)
        stubs: dict[str, _Stub] = {}
        originals: list[tuple[nn.Module, str, nn.Module]] = []
        # Stubs are pooled and reused: building an nn.Module costs about as much as a small fusion
        # head's forward, and training fixes call the head several times a step. A pool (not one
        # stub per modality) keeps nested calls apart.
        pool = self.__dict__.setdefault("_stub_pool", [])
        try:
            for m, value in replacements.items():
                path = self.encoders[m]  # type: ignore[index]
                parent_path, _, child = path.rpartition(".")
                parent = self._module(parent_path) if parent_path else root
                originals.append((parent, child, parent._modules[child]))
                stubs[m] = pool.pop() if pool else _Stub(None)
                stubs[m].value, stubs[m].calls = value, 0
                parent._modules[child] = stubs[m]
            yield stubs
        finally:
            for parent, child, module in reversed(originals):
                parent._modules[child] = module
            for stub in stubs.values():
                stub.value = None  # hold no features (or their graph) between calls
                pool.append(stub)

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, Any]]:
        """Record each encoder's output during a forward (dict filled as the encoders run)."""
        captured: dict[str, Any] = {}
        handles = []
        try:
            for m in self.modalities:
                def hook(_mod: nn.Module, _inp: Any, out: Any, m: str = m) -> None:
                    captured[m] = out
                handles.append(self.encoder_module(m).register_forward_hook(hook))
            yield captured
        finally:
            for h in handles:
                h.remove()

    def encode(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        """One full forward; returns the fused logits and every encoder's (unpooled) output."""
        with self.capture() as captured:
            logits = self.call_model(inputs)
        missing = [m for m in self.modalities if m not in captured]
        if missing:
            raise AdapterError(
                f"The encoder of {', '.join(missing)} ({', '.join(self.encoders[m] for m in missing)}) "  # type: ignore[index]
                "was not called during forward. Name the module that encodes each modality with --encoder."
            )
        return logits, dict(captured)

    def head_forward(self, inputs: Mapping[str, Tensor], features: Mapping[str, Any]) -> Tensor:
        """Logits from given encoder outputs: encoders are stubbed, only fusion and head run.

        ``inputs`` is still passed to the model (its forward signature needs it) but the stubs
        ignore it. Gradients flow into ``features``.
        """
        with self._swapped(features):
            return self.call_model(inputs)

    # ------------------------------------------------------------------ masking
    def _baseline_like(self, value: Tensor, stats: MaskStats, m: str, generator: torch.Generator | None) -> Tensor:
        if self.mask == "zero" or m not in stats.mean:
            return torch.zeros_like(value)
        mean = torch.as_tensor(stats.mean[m], dtype=value.dtype, device=value.device).expand_as(value)
        if self.mask == "mean" or not value.dtype.is_floating_point:
            # integer inputs (token ids) cannot carry Gaussian noise: they get the rounded mean
            return mean.clone()
        std = torch.as_tensor(stats.std[m], dtype=value.dtype, device=value.device).expand_as(value)
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype, device="cpu").to(value.device)
        return mean + std * noise

    def masked_inputs(
        self, inputs: Mapping[str, Tensor], present: Sequence[str], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The batch with every modality not in ``present`` replaced by its input-level baseline."""
        return {
            m: (inputs[m] if m in present else self._baseline_like(inputs[m], self.input_stats, m, generator))
            for m in self.modalities
        }

    def masked_features(
        self, features: Mapping[str, Any], present: Sequence[str], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Encoder outputs with every modality not in ``present`` replaced by its feature-level baseline."""
        out: dict[str, Any] = {}
        for m in self.modalities:
            if m in present:
                out[m] = features[m]
            else:
                out[m] = map_tensors(
                    lambda t, m=m: self._baseline_like(t, self.feature_stats, m, generator), features[m]
                )
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
            "notes": list(self.notes),
        }

    def verify(self, inputs: Mapping[str, Tensor], atol: float = 1e-4) -> None:
        """Check the adapter against one real batch, falling back to input masking if needed.

        Runs the model once (validating the logits), and when masking at the feature level, checks
        that feeding the captured encoder outputs back through stubbed encoders reproduces the
        logits even when the raw inputs are zeroed. If it does not (the model reuses an encoder, or
        a modality bypasses its encoder),
        feature-level masking would be wrong: the adapter switches to input masking and says why.
        """
        with torch.no_grad():
            if not self.encoders:
                self.call_model(inputs)
                return
            try:
                logits, feats = self.encode(inputs)
                # Replay with the inputs zeroed: if the logits still match, each modality reaches
                # the rest of the network only through its encoder's output.
                blank = {m: torch.zeros_like(t) for m, t in inputs.items()}
                replay = self.head_forward(blank, feats)
                calls_ok = True
            except AdapterError as exc:
                if self.mask_at == "feature":
                    self.notes.append(f"feature-level masking unavailable ({exc}); masking inputs instead")
                    self.mask_at = "input"
                self.encoders = None
                self.call_model(inputs)
                return
            same = replay.shape == logits.shape and torch.allclose(replay, logits, atol=atol, rtol=1e-4)
            if not (same and calls_ok):
                self.notes.append(
                    "replaying cached encoder outputs did not reproduce the model's logits (a modality "
                    "reaches the head outside its encoder, or the model is stochastic in eval mode); "
                    "masking inputs instead and skipping encoder-level diagnostics"
                )
                self.mask_at = "input"
                self.encoders = None
