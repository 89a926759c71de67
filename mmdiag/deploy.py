"""Deployment with missing modalities: restore them from the present ones instead of zeroing them.

The ``restore`` fix trains a :class:`~mmdiag.fixes.restore.Translator` beside the model (``mmdiag
rebalance --fix restore`` writes it as ``restore.safetensors`` + ``restore.json`` next to
``model.safetensors``). This module saves and loads it and wraps a model with it::

    translator = load_restoration("rebalanced/")
    net = with_restoration(model, translator)        # modalities and encoders as the adapter finds them
    logits = net({"visual": x_visual})               # audio missing: restored, not zeroed
    logits = net({"audio": None, "visual": x_visual})  # the same

A modality is missing for a whole batch when its key is absent or its value is None (group the rows
of a batch by which modalities they have). :func:`attach_restoration` makes an adapter's feature
masking restore instead, which is how ``analyze(restore=DIR)`` evaluates every modality subset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import AdapterError, ConfigError, LoadError
from mmdiag.fixes.restore import FORMAT, Translator
from mmdiag.io import write_atomic
from mmdiag.loading import save_state_dict

__all__ = ["RESTORE_META", "RESTORE_WEIGHTS", "RestoredModel", "attach_restoration", "check_restored",
           "load_restoration", "save_restoration", "with_restoration"]

RESTORE_WEIGHTS = "restore.safetensors"
RESTORE_META = "restore.json"

#: what the report says restoration changed
RESTORE_NOTE = ("the logits of every modality subset are computed with the absent modalities' encoder outputs "
                "restored by the translator from the present ones, not masked; the empty subset stays masked")


def save_restoration(translator: Translator, directory: str | os.PathLike[str]) -> Path:
    """Write ``restore.safetensors`` (weights) and ``restore.json`` (modalities, shapes, architecture)
    into ``directory`` (created when missing); returns the weights' path."""
    folder = Path(directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    meta = translator.describe()
    state = {k: v.detach().cpu().contiguous() for k, v in translator.state_dict().items()}
    save_state_dict(state, folder / RESTORE_WEIGHTS)
    write_atomic(folder / RESTORE_META, json.dumps(meta, indent=2) + "\n")
    return folder / RESTORE_WEIGHTS


def _paths(source: str | os.PathLike[str]) -> tuple[Path, Path]:
    path = Path(source).expanduser()
    folder = path.parent if path.is_file() else path
    weights, meta = folder / RESTORE_WEIGHTS, folder / RESTORE_META
    missing = [p.name for p in (weights, meta) if not p.is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else None
        raise LoadError(
            f"Cannot load a restoration translator from {path}: expected {RESTORE_WEIGHTS} and {RESTORE_META} "
            f"in {folder}; missing {', '.join(missing)}"
            + (f" (the folder holds {', '.join(found) or 'nothing'})" if found is not None else " (no such folder)")
            + ". Pass the folder where `mmdiag rebalance --fix restore` wrote the model, or save a translator "
            "with mmdiag.deploy.save_restoration.")
    return weights, meta


def load_restoration(directory: str | os.PathLike[str]) -> Translator:
    """The translator saved in ``directory`` (or beside the given ``restore.safetensors``), in eval mode."""
    weights, meta_path = _paths(directory)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise LoadError(f"{meta_path} has format {meta.get('format')!r}; this mmdiag reads format {FORMAT}. "
                            "Save the translator again with this version.")
        mods = [str(m) for m in meta["modalities"]]
        sizes = {m: (int(meta["in_features"][m]), [int(s) for s in meta["shapes"][m]]) for m in mods}
        translator = Translator(mods, int(meta["hidden"]), int(meta["flatten_limit"]), int(meta.get("seed", 0)),
                                sizes=sizes)
        translator.inputs = {m: dict(v) for m, v in (meta.get("inputs") or {}).items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"{meta_path} is not a translator description ({type(exc).__name__}: {exc}); expected the "
                        f"JSON written by mmdiag.deploy.save_restoration. Save the translator again.") from None
    from safetensors.torch import load_file

    try:
        translator.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise LoadError(f"{weights} does not match {meta_path}: {str(exc).splitlines()[0]}. Keep the two files "
                        "of one save together.") from None
    return translator.eval()


def _translator_of(restore: Any) -> tuple[Translator, str]:
    if isinstance(restore, Translator):
        return restore, "a Translator object"
    if isinstance(restore, RestoredModel):
        return restore.translator, "the translator of a RestoredModel"
    if isinstance(restore, (str, os.PathLike)):
        translator = load_restoration(restore)
        translator.requires_grad_(False)
        return translator, str(restore)
    raise ConfigError(f"`restore` must be a folder holding {RESTORE_WEIGHTS} and {RESTORE_META}, or a Translator; "
                      f"found {type(restore).__name__}.")


def attach_restoration(adapter: ModelAdapter, restore: Any) -> dict[str, Any]:
    """Make ``adapter.masked_features`` restore absent modalities with the translator ``restore``
    (a folder or a :class:`Translator`); returns the facts the report records (``settings.restore``)."""
    translator, source = _translator_of(restore)
    if set(translator.modalities) != set(adapter.modalities):
        raise ConfigError(f"The translator restores {', '.join(translator.modalities)}, but the model's modalities are "
                          f"{', '.join(adapter.modalities)}. Pass the translator trained with this model.")
    if not adapter.has_encoders or adapter.mask_at != "feature":
        raise ConfigError("Restoration replaces the encoder outputs of absent modalities, so it needs feature-level "
                          "masking: name each modality's encoder (`encoders={MODALITY: MODULE}`) and leave "
                          f"`mask_at` at feature; found mask_at={adapter.mask_at!r}.")
    adapter.restorer = translator.restore
    meta = translator.describe()
    return {"from": source, "modalities": meta["modalities"], "shapes": meta["shapes"], "hidden": meta["hidden"],
            "note": RESTORE_NOTE}


def check_restored(adapter: ModelAdapter) -> None:
    """AdapterError when a restorer is set but the adapter fell back to input masking (after verify)."""
    if adapter.restorer is not None and adapter.mask_at != "feature":
        raise AdapterError("Restoration was asked for, but feature-level masking was given up for this model ("
                           f"{adapter.black_box_reason or 'no encoders'}), so the subsets would be masked at the "
                           "input, not restored. Name encoders whose outputs replay exactly "
                           "(`encoders={MODALITY: MODULE}`), or analyse without restoration.")


class RestoredModel(nn.Module):
    """``model`` whose missing modalities are restored by ``translator``; see :func:`with_restoration`."""

    def __init__(self, model: nn.Module, translator: Translator, adapter: ModelAdapter) -> None:
        super().__init__()
        self.model = model
        self.translator = translator
        self.adapter = adapter
        adapter.restorer = translator.restore

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.adapter.modalities

    def _placeholder(self, m: str, batch: int, device: torch.device) -> Tensor:
        spec = self.translator.inputs.get(m)
        if not spec:
            raise ConfigError(f"{m} is missing and the translator does not record its input shape, which the model's "
                              "forward needs a placeholder for. Use a translator saved after training with the "
                              "restore fix (it records the input shapes).")
        return torch.zeros(batch, *spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)

    def forward(self, inputs: Mapping[str, Tensor | None]) -> Tensor:
        """Class logits [B, C]; a modality whose key is absent or None is restored from the others."""
        mods = self.adapter.modalities
        unknown = [k for k in inputs if k not in mods]
        if unknown:
            raise ConfigError(f"Unknown modality {unknown[0]!r}; expected some of {', '.join(mods)}.")
        present = tuple(m for m in mods if inputs.get(m) is not None)
        if not present:
            raise ConfigError(f"Every modality is missing; give at least one of {', '.join(mods)}.")
        if len(present) == len(mods):
            return self.adapter.call_model(inputs)  # type: ignore[arg-type]
        ref = inputs[present[0]]
        assert ref is not None
        full = {m: inputs[m] if m in present else self._placeholder(m, ref.shape[0], ref.device) for m in mods}
        _, feats = self.adapter.encode(full)  # type: ignore[arg-type]
        return self.adapter.head_forward(full, self.adapter.masked_features(feats, present))  # type: ignore[arg-type]


def with_restoration(model: nn.Module, translator: Translator | str | os.PathLike[str], *,
                     modalities: Sequence[str] | None = None, encoders: Mapping[str, str] | None = None,
                     call: str | None = None) -> RestoredModel:
    """An ``nn.Module`` that runs ``model`` with missing modalities restored, not zeroed.

    Args:
        model: the trained model (the one the translator was trained with).
        translator: a :class:`Translator` or the folder it was saved in.
        modalities: names in the model's positional order (default: the translator's).
        encoders: modality -> dotted encoder submodule (default: found by name, as the adapter does).
        call: the model's call convention (default: detected).

    The module takes one dict ``{modality: tensor}``; a modality whose key is absent or None is
    missing for the whole batch. It runs the encoders of the present modalities (a missing one
    runs on a zero placeholder whose output is discarded), restores each missing modality's
    encoder output with the translator from the present ones, and runs the fusion head; it
    returns class logits [B, C] as mmdiag reads them (a single-logit binary model gives [0, z]).
    """
    if not isinstance(translator, Translator):
        translator = load_restoration(translator)
    mods = tuple(modalities) if modalities is not None else translator.modalities
    adapter = ModelAdapter(model, mods, call=call, encoders=dict(encoders) if encoders else None)  # type: ignore[arg-type]
    if not adapter.has_encoders:
        raise ConfigError("with_restoration replaces encoder outputs, but no encoder is known for this model; name "
                          "them with `encoders={MODALITY: MODULE}`.")
    if set(translator.modalities) != set(mods):
        raise ConfigError(f"The translator restores {', '.join(translator.modalities)}, but `modalities` are "
                          f"{', '.join(mods)}. Pass the translator trained with this model.")
    return RestoredModel(model, translator, adapter)
