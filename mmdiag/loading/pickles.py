"""Looking inside a torch checkpoint's pickle without running it.

The opcodes of a pickle name every class and function it would call; reading them runs nothing.
That tells a corrupted file from one that needs real unpickling, and names what the latter
references. To say *where* such objects sit (beside the weights, as a Lightning checkpoint's
``hyper_parameters``, or among them), the file is loaded once more with every referenced name
mapped to an inert stand-in class, so no code from the file runs.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from mmdiag.loading.layouts import unwrap


class _Corrupt(Exception):
    """Internal: the file is not a readable checkpoint."""


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


class _Opaque:
    """Stands in for a class or function a checkpoint references, so that where such objects sit
    can be found without running anything: building one ignores its arguments and state."""

    name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _opaque_names(obj: Any, depth: int = 0) -> set[str]:
    if isinstance(obj, _Opaque) or (isinstance(obj, type) and issubclass(obj, _Opaque)):
        return {obj.name}
    if depth > 40:
        return set()
    if isinstance(obj, Mapping):
        items: Any = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    else:
        return set()
    found: set[str] = set()
    for x in items:
        found |= _opaque_names(x, depth + 1)
    return found


def _objects_beside_weights(path: Path, odd: Sequence[str], key: str | None) -> str | None:
    """Why a checkpoint is refused when only entries beside its weights hold Python objects
    (a Lightning checkpoint's ``hyper_parameters``, say); ``None`` when the weights do too or the
    layout cannot be read. Every object the file references is replaced by an inert stand-in."""
    allowed = _numpy_scalar_globals()
    covered = {a[1] if isinstance(a, tuple) else f"{a.__module__}.{a.__qualname__}" for a in allowed}
    stubs = [(type("Opaque", (_Opaque,), {"name": n}), n) for n in odd if n not in covered]
    try:
        with _quiet(), torch.serialization.safe_globals([*allowed, *stubs]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        state, _, where, _ = unwrap(obj, path, "torch", key)
    except Exception:
        return None
    if where is None or _opaque_names(state) or not isinstance(obj, Mapping):
        return None
    entries = {k: sorted(_opaque_names(v)) for k, v in obj.items() if k != where}
    entries = {k: v for k, v in entries.items() if v}
    if not entries:
        return None
    names = sorted({n for v in entries.values() for n in v})
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    held = ", ".join(repr(k) for k in entries)
    lightning = (
        " (Lightning saves the LightningModule's hyperparameters there)"
        if "hyper_parameters" in entries else ""
    )
    return (
        f"its weights under {where!r} are plain tensors, but {held} beside them "
        f"{'holds' if len(entries) == 1 else 'hold'} Python objects ({shown}) that only full "
        f"unpickling can rebuild{lightning}"
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's loader warnings (deprecations, pickle protocol notes): what matters is
    reported through the result or a LoadError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
