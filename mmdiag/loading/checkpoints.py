"""Reading checkpoints safely (weights_only, safetensors, trust) and loading them into a model."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import re
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mmdiag.errors import ConfigError, LoadError

#: The advice that ends every refusal to unpickle an untrusted checkpoint.
TRUST_HINT = (
    "Pass --trust-checkpoint only if the file comes from a source you trust; otherwise re-save it "
    "as a plain state dict (torch.save(model.state_dict(), path)) or as .safetensors."
)

_WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net", "module")
_STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
_SHOW = 5  # how many keys of each kind a mismatch message lists


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load_checkpoint` found and did.

    ``format`` is "torch", "safetensors", "torchscript" or "module-pickle"; ``wrapper`` the key of
    the dict the state dict was found under (``None`` for a bare state dict); ``stripped_prefix``
    the prefix removed from every key ("module.", "_orig_mod." or both, ``None`` if none);
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


class _Corrupt(Exception):
    """Internal: the file is not a readable checkpoint."""


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


def _pickle_globals(data: bytes | io.BufferedIOBase, n_pickles: int = 1) -> list[str]:
    """Globals referenced by the first ``n_pickles`` pickles, read without executing anything.

    Raises :class:`_Corrupt` when the bytes are not a well-formed pickle.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    found: list[str] = []
    for _ in range(n_pickles):
        strings: list[str] = []
        saw_stop = False
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
                if op.name == "STOP":
                    saw_stop = True
        except Exception as e:
            raise _Corrupt(f"its pickle data is malformed ({type(e).__name__}: {e})") from e
        if not saw_stop:
            raise _Corrupt("its pickle data ends early")
    return found


_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - refuse everything
        raise pickle.UnpicklingError(f"global {module}.{name} not allowed")


def _untrusted_content(path: Path) -> list[str]:
    """The non-tensor globals of a torch checkpoint, read without running it (or ``_Corrupt``)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not pkl:
                    raise _Corrupt("it is a zip archive without the data.pkl of a torch.save file")
                data = z.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise _Corrupt(f"its zip archive is damaged ({type(e).__name__}: {e})") from e
        names = _pickle_globals(data)
    else:
        try:
            with open(path, "rb") as f:
                try:
                    magic = _NoGlobals(f).load()
                except Exception as e:
                    raise _Corrupt(f"it does not start with a pickle ({type(e).__name__}: {e})") from e
                if magic != _TORCH_MAGIC:
                    raise _Corrupt("it is neither a zip archive nor a legacy torch.save file")
                names = _pickle_globals(f, n_pickles=3)  # protocol, sys_info, the object
        except OSError as e:
            raise _Corrupt(f"{type(e).__name__}: {e}") from e
    harmless = ("torch._utils.", "torch.storage.", "collections.OrderedDict", "torch.Size")
    odd = []
    for n in names:
        if n.startswith(harmless) or re.fullmatch(r"torch\.\w*Storage", n) or n in odd:
            continue
        odd.append(n)
    return odd


def _weights_only_refusal(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text or (
        "weights_only" in text and "Unsupported" in text
    )


def _numpy_scalar_globals() -> list[Any]:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [
        np.dtype,
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),  # the name numpy 1.x pickles under
        (scalar, "numpy._core.multiarray.scalar"),
    ]
    for name in dir(np.dtypes):
        if name.endswith("DType") and name not in ("ObjectDType", "StringDType", "VoidDType"):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def _read_checkpoint(path: Path, trust: bool) -> tuple[Any, str]:
    """The raw object in ``path`` and its format name."""
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
        what = "it contains Python objects other than tensors" + (
            f" (it references {shown})" if shown else ""
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's loader warnings (deprecations, pickle protocol notes): what matters is
    reported through the result or a LoadError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return line[:300]


def _is_tensor_map(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
        for k, v in obj.items()
    )


def _unwrap(obj: Any, path: Path, fmt: str) -> tuple[dict[str, Any], str, str | None]:
    """(state dict, format, wrapper key) from whatever the checkpoint file held."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), ("torchscript" if fmt == "torchscript" else "module-pickle"), None
    if _is_tensor_map(obj):
        return dict(obj), fmt, None
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict()), "module-pickle", key
            if _is_tensor_map(inner):
                return dict(inner), fmt, key
        keys = [repr(k) for k in list(obj)[:10]]
        found = f"a dict with keys {', '.join(keys)}" + (" ..." if len(obj) > 10 else "")
        if not obj:
            found = "an empty dict"
    else:
        found = f"a {type(obj).__module__}.{type(obj).__qualname__}"
    raise LoadError(
        f"Checkpoint {path} holds {found}; expected a state dict (a mapping of parameter names to "
        f"tensors), a dict with one under 'state_dict', 'model_state_dict', 'model', 'net' or "
        f"'module', or a whole nn.Module. Re-save it with torch.save(model.state_dict(), path)."
    )


def _strip_prefixes(state: dict[str, Any], model_keys: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    stripped = ""
    changed = True
    while changed and state:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(
                k.startswith(prefix) for k in model_keys
            ):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped += prefix
                changed = True
    return state, (stripped or None)


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _list_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (", ..." if len(keys) > _SHOW else "")


def load_checkpoint(
    model: nn.Module, path: str | Path, *, trust: bool = False, strict: bool = True
) -> CheckpointInfo:
    """Load the weights in ``path`` into ``model`` (in place) and say what was found.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. Pickled modules, TorchScript archives and checkpoints with
    arbitrary Python objects need ``trust=True``. Wrapper dicts (``{"state_dict": ...}`` and
    friends) are unwrapped and ``module.``/``_orig_mod.`` prefixes stripped when the model's keys
    lack them. Keys and shapes are compared before loading: with ``strict`` any difference is a
    :class:`LoadError`; without it, what fits is loaded and the rest is listed in the result.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise LoadError(
            f"Checkpoint {path} does not exist (looked in {path.resolve()}). Expected a file "
            f"written by torch.save or safetensors; check the path given to --checkpoint."
        )
    if not path.is_file():
        raise LoadError(
            f"Checkpoint {path} is a folder, expected a single file written by torch.save or "
            f"safetensors. Point --checkpoint at the weights file inside it."
        )
    if path.stat().st_size == 0:
        raise _corrupt_error(path, "it is empty (0 bytes)")
    raw, fmt = _read_checkpoint(path, trust)
    state, fmt, wrapper = _unwrap(raw, path, fmt)
    n_tensors = sum(isinstance(v, torch.Tensor) for v in state.values())

    model_state = model.state_dict()
    state, stripped = _strip_prefixes(state, list(model_state))
    missing = [
        k for k in model_state if k not in state and not k.endswith("num_batches_tracked")
    ]  # BatchNorm fills a missing counter itself
    unexpected = [k for k in state if k not in model_state]
    mismatched = [
        k for k in model_state if k in state and _shape(state[k]) != _shape(model_state[k])
    ]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} model key(s) missing from the checkpoint ({_list_keys(missing)})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected checkpoint key(s) the model lacks "
                f"({_list_keys(unexpected)})"
            )
        if mismatched:
            shapes = [
                f"{k}: checkpoint {_shape(state[k])} vs model {_shape(model_state[k])}"
                for k in mismatched
            ]
            parts.append(f"{len(mismatched)} shape mismatch(es) ({_list_keys(shapes)})")
        raise LoadError(
            f"Checkpoint {path} does not fit the model: expected the model's "
            f"{len(model_state)} keys with the same shapes, found {n_tensors} tensors with "
            + "; ".join(parts)
            + ". Check that --model builds the same architecture (and its keyword arguments) as "
            "the one that was trained."
        )
    to_load = {k: v for k, v in state.items() if k in model_state and k not in mismatched}
    try:
        model.load_state_dict(to_load, strict=False)
    except Exception as e:
        raise LoadError(
            f"Checkpoint {path} matched the model's keys and shapes but loading it failed with "
            f"{type(e).__name__}: {_first_line(str(e))}. Check that --model builds the same "
            f"architecture (and its keyword arguments) as the one that was trained."
        ) from e
    return CheckpointInfo(
        path=str(path),
        format=fmt,
        wrapper=wrapper,
        stripped_prefix=stripped,
        n_tensors=n_tensors,
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
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
            f"found non-tensor entries {', '.join(map(repr, bad[:_SHOW]))}. Pass "
            f"model.state_dict() or a dict of tensors."
        )
    folder = path.parent
    if not folder.is_dir():
        raise LoadError(
            f"Cannot save a state dict to {path}: the folder {folder} does not exist. Create it "
            f"first or choose another output path."
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(_for_safetensors(state), str(tmp), metadata={"format": "pt"})
        else:
            torch.save({k: v.detach() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise LoadError(
                f"Cannot save a state dict to {path}: {type(e).__name__}: {e}. Check that the "
                f"folder is writable and the disk is not full."
            ) from e
        raise


