"""Reading checkpoints safely (weights_only, safetensors, trust) and loading them into a model.

Where the weights sit in what was read, and how their names map onto the model's, is
:mod:`mmdiag.loading.layouts`; Hugging Face style folders are :mod:`mmdiag.loading.folders`;
looking inside a pickle without running it is :mod:`mmdiag.loading.pickles`.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mmdiag.errors import ConfigError, LoadError
from mmdiag.io import write_atomic_with
from mmdiag.loading.folders import folder_plan, merge_shards
from mmdiag.loading.layouts import SHOW, differences, match_keys, mismatch_error, unwrap
from mmdiag.loading.pickles import (
    _Corrupt,
    _numpy_scalar_globals,
    _objects_beside_weights,
    _quiet,
    _untrusted_content,
)

#: The advice that ends every refusal to unpickle an untrusted checkpoint.
TRUST_HINT = (
    "Pass `trust=True` only if the file comes from a source you trust; otherwise re-save it "
    "as a plain state dict (torch.save(model.state_dict(), path)) or as .safetensors."
)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load_checkpoint` found and did.

    ``format`` is "torch", "safetensors", "torchscript" or "module-pickle"; ``layout`` how the
    weights were stored: "state-dict" (a bare state dict), "wrapped" (under a key of a dict),
    "lightning" (a Lightning checkpoint), "module" (a whole pickled module), "hf-folder" or
    "hf-sharded" (a Hugging Face style folder, ``files`` lists the weight files read); ``wrapper``
    the key of the dict the state dict was read from (``None`` for a bare state dict);
    ``stripped_prefix`` the prefix removed from the keys ("module.", "model.", "_orig_mod."...;
    ``None`` if none); ``dropped`` the checkpoint keys outside that prefix, left out because the
    rest matched the model exactly (a LightningModule's loss or teacher modules, say);
    ``n_tensors`` the number of tensors in the checkpoint's state dict. With ``strict=False`` the
    keys that were not loaded are listed in ``missing`` (model keys absent from the checkpoint),
    ``unexpected`` (checkpoint keys the model lacks) and ``mismatched`` (keys whose shapes differ).
    """

    path: str
    format: str
    wrapper: str | None
    stripped_prefix: str | None
    n_tensors: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    layout: str = "state-dict"
    dropped: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


def checkpoint_settings(info: CheckpointInfo | None) -> dict[str, Any]:
    """The ``settings`` entries of a report about the checkpoint loaded (all ``None`` without one)."""
    if info is None:
        return dict.fromkeys(("checkpoint_format", "checkpoint_layout", "checkpoint_key",
                              "checkpoint_prefix_stripped", "checkpoint_keys_dropped"))
    return {
        "checkpoint_format": info.format,
        "checkpoint_layout": info.layout,
        "checkpoint_key": info.wrapper,
        "checkpoint_prefix_stripped": info.stripped_prefix,
        "checkpoint_keys_dropped": len(info.dropped),
    }


def _corrupt_error(path: Path, reason: str) -> LoadError:
    return LoadError(
        f"Checkpoint {path} could not be read as a PyTorch or safetensors checkpoint: {reason}; "
        f"the file may be truncated or corrupted. Expected a file written by torch.save, "
        f"torch.jit.save or safetensors; check that it was copied completely (compare its size "
        f"with the original) or save it again."
    )


def _refused(path: Path, what: str) -> LoadError:
    return LoadError(
        f"Refused to load checkpoint {path}: {what}, and loading it needs arbitrary unpickling, "
        f"which can run code from the file. mmdiag only reads tensors unless told otherwise. "
        + TRUST_HINT
    )


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= size - 8


def _is_torchscript_zip(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    for n in names:
        parts = n.split("/")
        if parts[-1] == "constants.pkl" or "code" in parts[:-1]:
            return True
    return False


def _weights_only_refusal(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text or (
        "weights_only" in text and "Unsupported" in text
    )


def _read_checkpoint(path: Path, trust: bool, key: str | None = None) -> tuple[Any, str]:
    """The raw object in ``path`` and its format name (``key``: where the weights are, for messages)."""
    if _looks_like_safetensors(path):
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu"), "safetensors"
        except Exception as e:
            raise _corrupt_error(path, f"{type(e).__name__}: {e}") from e
    if path.suffix == ".safetensors":
        raise _corrupt_error(path, "it does not start with a safetensors header")

    if _is_torchscript_zip(path):
        if not trust:
            raise _refused(path, "it is a TorchScript archive (written by torch.jit.save)")
        try:
            with _quiet():
                scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise _corrupt_error(path, f"torch.jit.load failed with {type(e).__name__}: {e}") from e
        return scripted, "torchscript"

    try:
        with _quiet():
            return torch.load(path, map_location="cpu", weights_only=True), "torch"
    except Exception as e:
        first = e
    text = str(first)
    if "TorchScript" in text or "torch.jit.load" in text:
        if not trust:
            raise _refused(path, "it is a TorchScript archive (written by torch.jit.save)")
        try:
            with _quiet():
                return torch.jit.load(str(path), map_location="cpu"), "torchscript"
        except Exception as e:
            raise _corrupt_error(path, f"torch.jit.load failed with {type(e).__name__}: {e}") from e
    if not _weights_only_refusal(first):
        raise _corrupt_error(path, f"{type(first).__name__}: {_first_line(text)}") from first
    # Training scripts often store numpy scalars (best accuracy, epoch) beside the weights.
    # Rebuilding a numpy scalar or dtype runs no user code, so allow those and nothing else.
    try:
        with _quiet(), torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True), "torch"
    except Exception:
        pass
    # The safe loader refused: either the file needs real unpickling or it is garbage that only
    # looked like a pickle. Tell them apart by reading the pickle opcodes, which runs nothing.
    try:
        odd = _untrusted_content(path)
    except _Corrupt as c:
        raise _corrupt_error(path, str(c)) from first
    if not trust and not odd:  # nothing to refuse: the safe loader failed for another reason
        raise _corrupt_error(path, f"{type(first).__name__}: {_first_line(text)}") from first
    if not trust:
        shown = ", ".join(odd[:3]) + (", ..." if len(odd) > 3 else "")
        what = _objects_beside_weights(path, odd, key) or (
            "it contains Python objects other than tensors"
            + (f" (it references {shown})" if shown else "")
        )
        raise _refused(path, what)
    try:
        with _quiet():
            return torch.load(path, map_location="cpu", weights_only=False), "torch"
    except (AttributeError, ModuleNotFoundError, ImportError) as e:
        raise LoadError(
            f"Checkpoint {path} could not be unpickled: {type(e).__name__}: {e}. A checkpoint "
            f"that pickles Python objects (such as a whole model) needs the code of their classes "
            f"importable under the same module names as when it was saved; make that code "
            f"importable, or re-save the checkpoint as a state dict."
        ) from e
    except Exception as e:
        raise _corrupt_error(path, f"{type(e).__name__}: {_first_line(str(e))}") from e


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return line[:300]


def _read_folder(path: Path, trust: bool) -> tuple[dict[str, Any], str, str, tuple[str, ...]]:
    """(state dict, format, layout, files read) of a Hugging Face style folder."""
    layout, files, weight_map = folder_plan(path)
    parts = []
    fmt = "torch"
    for f in files:
        raw, fmt = _read_checkpoint(f, trust)
        parts.append((f, raw))
    if weight_map is None:
        state, fmt, _, _ = unwrap(parts[0][1], files[0], fmt)
    else:
        state = merge_shards(path, parts, weight_map)
    return state, fmt, layout, tuple(str(f) for f in files)


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    trust: bool = False,
    strict: bool = True,
    key: str | None = None,
    strip_prefix: str | None = None,
) -> CheckpointInfo:
    """Load the weights in ``path`` into ``model`` (in place) and say what was found.

    ``path`` is a file or a Hugging Face style folder (``model.safetensors``, ``pytorch_model.bin``
    or their sharded forms with an index). ``.safetensors`` files are read with safetensors;
    anything else with ``torch.load(weights_only=True)``. Pickled modules, TorchScript archives and
    checkpoints with arbitrary Python objects need ``trust=True``. The state dict is taken from the
    entry ``key`` when given (a dotted path reaches into nested dicts), else from a bare state dict,
    a wrapper dict (``{"state_dict": ...}``, a Lightning checkpoint and friends). A prefix is
    stripped when one makes the keys match the model's (``module.``, ``_orig_mod.``, a
    LightningModule's attribute, ...; see :mod:`mmdiag.loading.layouts`), or exactly
    ``strip_prefix`` when given. Keys and shapes are compared before loading: with ``strict`` any
    difference is a :class:`LoadError`; without it, what fits is loaded and the rest is listed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise LoadError(
            f"Checkpoint {path} does not exist (looked in {path.resolve()}). Expected a file "
            f"written by torch.save or safetensors, or a folder written by save_pretrained; check "
            f"the path given as `checkpoint`."
        )
    files: tuple[str, ...] = (str(path),)
    if path.is_dir() or path.name.endswith(".index.json"):
        if key is not None:
            raise ConfigError(
                f"`key={key!r}` names an entry of a checkpoint file, but {path} is a "
                f"folder of weight files (or their index), which hold bare state dicts. Drop "
                f"`key`."
            )
        state, fmt, layout, files = _read_folder(path, trust)
        wrapper = None
    else:
        if path.stat().st_size == 0:
            raise _corrupt_error(path, "it is empty (0 bytes)")
        raw, fmt = _read_checkpoint(path, trust, key)
        state, fmt, wrapper, layout = unwrap(raw, path, fmt, key)
    n_tensors = sum(isinstance(v, torch.Tensor) for v in state.values())

    model_state = model.state_dict()
    match = match_keys(state, model_state, path, strip_prefix, drop_others=layout == "lightning")
    missing, unexpected, mismatched = differences(match.state, model_state)
    if strict and (missing or unexpected or mismatched):
        raise mismatch_error(path, match, model_state, n_tensors, strip_prefix is not None)
    to_load = {k: v for k, v in match.state.items() if k in model_state and k not in mismatched}
    try:
        model.load_state_dict(to_load, strict=False)
    except Exception as e:
        raise LoadError(
            f"Checkpoint {path} matched the model's keys and shapes but loading it failed with "
            f"{type(e).__name__}: {_first_line(str(e))}. Check that `model` builds the same "
            f"architecture (and its keyword arguments) as the one that was trained."
        ) from e
    return CheckpointInfo(
        path=str(path),
        format=fmt,
        wrapper=wrapper,
        stripped_prefix=match.prefix,
        n_tensors=n_tensors,
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
        layout=layout,
        dropped=match.dropped,
        files=files,
    )


def _for_safetensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().to("cpu")
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        whole = storage.nbytes() == t.numel() * t.element_size()
        if (ptr in seen and t.numel() > 0) or not whole or not t.is_contiguous():
            t = t.contiguous().clone()
        else:
            seen.add(ptr)
        out[k] = t
    return out


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state`` atomically: safetensors for ``.safetensors``, else ``torch.save``."""
    path = Path(path).expanduser()
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(
            f"Cannot save a state dict to {path}: expected a mapping of str names to tensors, "
            f"found non-tensor entries {', '.join(map(repr, bad[:SHOW]))}. Pass "
            f"model.state_dict() or a dict of tensors."
        )
    folder = path.parent
    if not folder.is_dir():
        raise LoadError(
            f"Cannot save a state dict to {path}: the folder {folder} does not exist. Create it "
            f"first or choose another output path."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            save_file(_for_safetensors(state), str(tmp), metadata={"format": "pt"})
    else:
        def write(tmp: Path) -> None:
            torch.save({k: v.detach() for k, v in state.items()}, tmp)
    try:
        write_atomic_with(path, write)
    except OSError as e:
        raise LoadError(
            f"Cannot save a state dict to {path}: {type(e).__name__}: {e}. Check that the "
            f"folder is writable and the disk is not full."
        ) from e


