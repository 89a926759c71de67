"""The zoo's cases: for each model shape, its data, how it is called and trained, its checkpoint
layout, and where its encoders are (for the reference's feature-level masking).

``prepare(case, folder)`` trains the model (seeded, a few hundred full-batch Adam steps at most),
writes the checkpoint and the evaluation ``.npz``, and computes the brute-force references from a
fresh model loaded from that checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import zoo_models
from .reference import EncoderSite, Reference, reference

MODELS_FILE = Path(zoo_models.__file__).resolve()
N_TRAIN = 300
N_TEST = 320  # two evaluation batches at mmdiag's default batch size of 256


# ---------------------------------------------------------------------------------------------
# Data: class prototypes plus Gaussian noise; "strength" sets how informative a modality is.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vec:
    """A float modality [d] (or a token sequence [t, d] when ``t``): strength * prototype[y] + noise."""

    d: int = 10
    strength: float = 1.0
    t: int | None = None


@dataclass(frozen=True)
class Tokens:
    """int64 ids [t] in 0..vocab-1: each token is one of the class's three ids with probability ``p``."""

    t: int = 6
    vocab: int = 12
    p: float = 0.5


def make_data(spec: Mapping[str, Any], n: int, n_classes: int, seed: int) -> dict[str, np.ndarray]:
    """Arrays in the order of ``spec`` (= the positional order) plus ``label``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    out: dict[str, np.ndarray] = {}
    for name, s in spec.items():
        if isinstance(s, Tokens):
            preferred = (y[:, None] * 3 + rng.integers(0, 3, size=(n, s.t))) % s.vocab
            noise = rng.integers(0, s.vocab, size=(n, s.t))
            out[name] = np.where(rng.random((n, s.t)) < s.p, preferred, noise).astype(np.int64)
        else:
            protos = rng.normal(size=(n_classes, s.d))
            if s.t is None:
                x = s.strength * protos[y] + rng.normal(size=(n, s.d))
            else:
                x = s.strength * protos[y][:, None, :] + rng.normal(size=(n, s.t, s.d))
            out[name] = x.astype(np.float32)
    out["label"] = y.astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def positional(*names: str) -> Callable[[nn.Module, Mapping[str, Tensor]], Any]:
    return lambda model, x: model(*[x[m] for m in names])


def as_dict(model: nn.Module, x: Mapping[str, Tensor]) -> Any:
    return model(dict(x))


def plain(out: Any) -> Tensor:
    return out


@dataclass(frozen=True)
class Case:
    """One model shape.

    Attributes:
        name: test id.
        factory: name of the ``build_*`` function in ``zoo_models.py``.
        data: modality name -> data spec, in the forward's positional order.
        call: how the reference (and training) calls the model on a dict of tensors.
        logits: the logits in the model's output.
        sites: modality -> (encoder module path, call index or None): where the reference masks
            features; None for a black box (the reference masks inputs only).
        encoders: what mmdiag should report as ``settings.adapter.encoders`` when it masks
            features (defaults to the paths in ``sites``).
        cli: extra ``mmdiag analyze`` arguments (``--encoder`` ...).
        binary: one output logit, labels 0/1, decision at logit 0.
        checkpoint: ``pt`` (plain state dict) or ``lightning`` (Lightning's .ckpt layout).
        steps, lr: training budget.
    """

    name: str
    factory: str
    data: Mapping[str, Any]
    call: Callable[[nn.Module, Mapping[str, Tensor]], Any]
    sites: Mapping[str, EncoderSite] | None
    logits: Callable[[Any], Tensor] = plain
    encoders: Mapping[str, str] | None = None
    cli: tuple[str, ...] = ()
    binary: bool = False
    checkpoint: str = "pt"
    steps: int = 120
    lr: float = 1e-2
    notes: str = ""

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.data)

    @property
    def n_classes(self) -> int:
        return 2 if self.binary else zoo_models.N_CLASSES

    @property
    def expected_encoders(self) -> dict[str, str] | None:
        if self.encoders is not None:
            return dict(self.encoders)
        return None if self.sites is None else {m: p for m, (p, _) in self.sites.items()}

    def build(self) -> nn.Module:
        return getattr(zoo_models, self.factory)()


def every_call(**paths: str) -> dict[str, EncoderSite]:
    return {m: (p, None) for m, p in paths.items()}


STRONG, WEAK = 0.9, 0.35

CASES: list[Case] = [
    Case("inplace_widedeep", "build_widedeep", {"wide": Vec(10, STRONG), "deep": Vec(10, WEAK)}, as_dict,
         every_call(wide="wide", deep="deep"),
         notes="out = self.wide(x); out.add_(self.deep(z))"),
    Case("inplace_iadd", "build_inplace_sum", {"audio": Vec(10, STRONG), "visual": Vec(10, WEAK)},
         positional("audio", "visual"), every_call(audio="audio_net", visual="visual_net"),
         notes="h = enc_a(a); h += enc_b(b)"),
    Case("inplace_relu", "build_inplace_relu", {"rgb": Vec(10, STRONG), "depth": Vec(10, WEAK)},
         positional("rgb", "depth"), every_call(rgb="rgb_net", depth="depth_net"),
         notes="nn.ReLU(inplace=True) / torch.relu_ on encoder outputs"),
    Case("binary_b1", "build_binary_b1", {"audio": Vec(10, STRONG), "visual": Vec(10, WEAK)},
         positional("audio", "visual"), every_call(audio="audio_net", visual="visual_net"), binary=True,
         notes="[B, 1] logit"),
    Case("binary_b", "build_binary_b", {"audio": Vec(10, STRONG), "visual": Vec(10, WEAK)},
         positional("audio", "visual"), every_call(audio="audio_net", visual="visual_net"), binary=True,
         notes="[B] logit"),
    Case("lightning_layout", "build_concat", {"audio": Vec(10, STRONG), "visual": Vec(10, WEAK)},
         positional("audio", "visual"), every_call(audio="audio_net", visual="visual_net"),
         checkpoint="lightning", notes="Lightning .ckpt: state_dict with 'model.' keys"),
    Case("transformer_cross_attention", "build_cross_attention",
         {"text": Vec(6, 0.45, t=5), "audio": Vec(6, 0.2, t=5)},
         positional("text", "audio"), every_call(text="text_encoder", audio="audio_encoder"), steps=80,
         notes="TransformerEncoder [B, T, D] encoders, MultiheadAttention fusion"),
    Case("embedding_dense", "build_embedding_dense", {"category": Tokens(6, 12, 0.45), "dense": Vec(8, WEAK)},
         positional("category", "dense"), every_call(category="category_embed", dense="dense_mlp"),
         notes="int64 ids -> nn.Embedding -> mean over T, beside a float MLP"),
    Case("moduledict_dict_forward", "build_moduledict", {"rgb": Vec(10, STRONG), "depth": Vec(10, WEAK)},
         as_dict, every_call(rgb="encoders.rgb", depth="encoders.depth"),
         notes="nn.ModuleDict encoders, forward(batch: dict)"),
    Case("dict_output", "build_dict_output", {"audio": Vec(10, STRONG), "visual": Vec(10, WEAK)},
         positional("audio", "visual"), every_call(audio="audio_net", visual="visual_net"),
         logits=lambda out: out["logits"], notes='forward returns {"logits", "features"}'),
    Case("dataclass_output", "build_dataclass_output", {"audio": Vec(10, STRONG), "visual": Vec(10, WEAK)},
         positional("audio", "visual"), every_call(audio="audio_net", visual="visual_net"),
         logits=lambda out: out.logits, notes="forward returns a dataclass with a logits field"),
    Case("shared_encoder", "build_siamese", {"left": Vec(10, STRONG), "right": Vec(10, WEAK)},
         positional("left", "right"), {"left": ("encoder", 0), "right": ("encoder", 1)},
         encoders={"left": "encoder", "right": "encoder"},
         cli=("--encoder", "left=encoder", "--encoder", "right=encoder"),
         notes="one encoder module applied to both modalities"),
    Case("presence_mask_arg", "build_presence_mask", {"rgb": Vec(10, STRONG), "depth": Vec(10, WEAK)},
         positional("rgb", "depth"), every_call(rgb="rgb_net", depth="depth_net"),
         notes="forward(rgb, depth, present=None)"),
    Case("tuple_encoder_output", "build_tuple_encoder", {"text": Vec(6, 0.45, t=5), "image": Vec(10, WEAK)},
         positional("text", "image"), every_call(text="text_model", image="image_net"),
         notes="encoder returns (sequence, pooled); fusion uses pooled"),
    Case("black_box", "build_black_box", {"image": Vec(10, STRONG), "sensor": Vec(10, WEAK)},
         positional("image", "sensor"), None, cli=("--call", "positional"),
         notes="no module named like a modality, forward(x1, x2): input masking"),
    Case("gated_three", "build_gated_three",
         {"audio": Vec(10, STRONG), "visual": Vec(10, 0.55), "text": Vec(10, 0.25)},
         positional("audio", "visual", "text"),
         every_call(audio="audio_net", visual="visual_net", text="text_net"),
         notes="three modalities, softmax-gated sum"),
]

CASES_BY_NAME = {c.name: c for c in CASES}


# ---------------------------------------------------------------------------------------------
# Training, checkpoints, references
# ---------------------------------------------------------------------------------------------


def tensors(arrays: Mapping[str, np.ndarray], modalities: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
    return {m: torch.from_numpy(arrays[m]) for m in modalities}, torch.from_numpy(arrays["label"])


def train(case: Case, model: nn.Module, arrays: Mapping[str, np.ndarray], seed: int = 0) -> nn.Module:
    """Full-batch Adam on the training split (cross-entropy, or BCE-with-logits when binary)."""
    torch.manual_seed(seed)
    x, y = tensors(arrays, case.modalities)
    opt = torch.optim.Adam(model.parameters(), lr=case.lr)
    model.train()
    for _ in range(case.steps):
        z = case.logits(case.call(model, x))
        if case.binary:
            loss = F.binary_cross_entropy_with_logits(z.reshape(-1), y.float())
        else:
            loss = F.cross_entropy(z, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


LIGHTNING_PREFIX = "model."


def save_checkpoint(case: Case, model: nn.Module, folder: Path) -> Path:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if case.checkpoint == "pt":
        path = folder / f"{case.name}.pt"
        torch.save(state, path)
    elif case.checkpoint == "lightning":
        path = folder / f"{case.name}.ckpt"
        torch.save({
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "2.5.0",
            "state_dict": {LIGHTNING_PREFIX + k: v for k, v in state.items()},
            "optimizer_states": [],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.001},
        }, path)
    else:
        raise ValueError(case.checkpoint)
    return path


def load_own(case: Case, path: Path) -> nn.Module:
    """A fresh model with the checkpoint's weights, read without mmdiag."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if case.checkpoint == "lightning":
        raw = {k[len(LIGHTNING_PREFIX):]: v for k, v in raw["state_dict"].items()}
    model = case.build()
    model.load_state_dict(raw)
    return model.eval()


@dataclass
class Prepared:
    case: Case
    model_spec: str
    checkpoint: Path
    data: Path
    feature_ref: Reference | None  # None for black boxes
    input_ref: Reference


def references(case: Case, model: nn.Module, arrays: Mapping[str, np.ndarray]) -> tuple[Reference | None, Reference]:
    x, y = tensors(arrays, case.modalities)
    feat = None
    if case.sites is not None:
        feat = reference(model, case.call, case.logits, x, y, case.modalities, case.sites, case.binary)
    inp = reference(model, case.call, case.logits, x, y, case.modalities, None, case.binary)
    return feat, inp


def prepare(case: Case, folder: Path, seed: int = 0) -> Prepared:
    folder.mkdir(parents=True, exist_ok=True)
    full = make_data(case.data, N_TRAIN + N_TEST, case.n_classes, seed)
    train_arrays = {k: v[:N_TRAIN] for k, v in full.items()}
    test_arrays = {k: v[N_TRAIN:] for k, v in full.items()}
    torch.manual_seed(seed)
    model = train(case, case.build(), train_arrays, seed)
    ckpt = save_checkpoint(case, model, folder)
    data = folder / f"{case.name}.npz"
    np.savez(data, **test_arrays)
    own = load_own(case, ckpt)
    feat, inp = references(case, own, test_arrays)
    return Prepared(case, f"{MODELS_FILE}:{case.factory}", ckpt, data, feat, inp)
