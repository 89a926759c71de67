"""Hugging Face style checkpoint folders: ``model.safetensors`` or ``pytorch_model.bin``, whole or
split into shards that an index file (``*.index.json``, written by ``save_pretrained``) names in
its ``weight_map``. Safetensors are preferred when a folder holds both. This module only lists
folders and reads the JSON index; :mod:`mmdiag.loading.checkpoints` reads the weight files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmdiag.errors import LoadError
from mmdiag.loading.layouts import describe, is_tensor_map, list_keys

#: Weight files of a Hugging Face style folder, in order of preference (safetensors first).
HF_FILES: tuple[tuple[str, str], ...] = (
    ("model.safetensors", "hf-folder"),
    ("model.safetensors.index.json", "hf-sharded"),
    ("pytorch_model.bin", "hf-folder"),
    ("pytorch_model.bin.index.json", "hf-sharded"),
)


def folder_plan(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(layout, weight files to read, weight_map or None) for a checkpoint folder or index file."""
    if path.is_file():  # the index of a sharded checkpoint, named directly
        weight_map = _read_index(path)
        return "hf-sharded", _shard_files(path.parent, path, weight_map), weight_map
    for name, layout in HF_FILES:
        if (path / name).is_file():
            if layout == "hf-folder":
                return layout, [path / name], None
            weight_map = _read_index(path / name)
            return layout, _shard_files(path, path / name, weight_map), weight_map
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(held[:12]) + (", ..." if len(held) > 12 else "") if held else "nothing"
    weights = [h for h in held if h.endswith((".pt", ".pth", ".ckpt", ".bin", ".safetensors"))]
    hint = (
        f" It holds {', '.join(weights[:3])}: point `checkpoint` at one of those files."
        if weights else " Point `checkpoint` at the weights file itself."
    )
    raise LoadError(
        f"Checkpoint folder {path} holds no weights mmdiag recognises: expected "
        f"{', '.join(n for n, _ in HF_FILES)} (a folder written by save_pretrained), found "
        f"{shown}.{hint}"
    )


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(
            f"Checkpoint index {index} could not be read: {type(e).__name__}: {e}. Expected the "
            f"JSON written by save_pretrained, with a 'weight_map' of parameter names to shard "
            f"files; copy it again from the original folder."
        ) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise LoadError(
            f"Checkpoint index {index} has no usable 'weight_map': expected a JSON object "
            f"mapping parameter names to shard file names, found {describe(data)}. Copy the index "
            f"again from the original folder."
        )
    return weight_map


def _shard_files(folder: Path, index: Path, weight_map: Mapping[str, str]) -> list[Path]:
    names = list(dict.fromkeys(weight_map.values()))
    outside = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
    if outside:
        raise LoadError(
            f"Checkpoint index {index} names shard files outside its folder ({list_keys(outside)}); "
            f"expected plain file names next to the index. Fix or regenerate the index."
        )
    absent = [n for n in names if not (folder / n).is_file()]
    if absent:
        raise LoadError(
            f"Checkpoint folder {folder} lacks {len(absent)} of the {len(names)} shard files its "
            f"index {index.name} names ({list_keys(absent)}). Copy the missing shards into the folder."
        )
    return [folder / n for n in names]


def merge_shards(
    source: Path, parts: Sequence[tuple[Path, Mapping[str, Any]]], weight_map: Mapping[str, str]
) -> dict[str, Any]:
    """One state dict from the shards' state dicts, checked against the index's weight_map."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for shard, state in parts:
        if not is_tensor_map(state):
            raise LoadError(
                f"Checkpoint shard {shard} holds {describe(state)}; expected a state dict "
                f"(parameter names mapped to tensors), as save_pretrained writes."
            )
        for k, v in state.items():
            if k in merged:
                raise LoadError(
                    f"Checkpoint shards {origin[k]} and {shard.name} both hold {k!r}; expected each "
                    f"tensor in one shard. Regenerate the sharded checkpoint."
                )
            merged[k] = v
            origin[k] = shard.name
    lost = [k for k, f in weight_map.items() if origin.get(k) != f]
    if lost:
        where = [f"{k} (index: {weight_map[k]}, found in: {origin.get(k, 'no shard')})" for k in lost]
        raise LoadError(
            f"Checkpoint {source}: its index does not agree with its shards: {len(lost)} tensor(s) are "
            f"not where the index says ({list_keys(where)}). Copy the folder again from the "
            f"original; the shards and the index must come from the same save."
        )
    return merged
