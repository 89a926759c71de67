"""Hugging Face style checkpoint folders: model.safetensors or pytorch_model.bin, whole or sharded
with an index, and the errors for folders that hold none of them or an incomplete set of shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmdiag.errors import LoadError
from mmdiag.loading import load_checkpoint
from tests.test_checkpoint_layouts import TwoModal, _prefixed, _same, _state


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("name,fmt", [("model.safetensors", "safetensors"), ("pytorch_model.bin", "torch")])
def test_hf_folder_single_file(tmp_path: Path, name: str, fmt: str) -> None:
    state = _state(12)
    _save(state, tmp_path / name)
    (tmp_path / "config.json").write_text("{}")
    model = TwoModal()
    info = load_checkpoint(model, tmp_path)
    assert _same(model, state) and (info.format, info.layout) == (fmt, "hf-folder")
    assert info.files == (str(tmp_path / name),) and info.path == str(tmp_path)


def test_hf_folder_prefers_safetensors(tmp_path: Path) -> None:
    good, other = _state(13), _state(14)
    _save(good, tmp_path / "model.safetensors")
    _save(other, tmp_path / "pytorch_model.bin")
    model = TwoModal()
    assert load_checkpoint(model, tmp_path).format == "safetensors" and _same(model, good)


def _write_shards(folder: Path, state: dict[str, torch.Tensor], ext: str, n: int = 3) -> dict[str, str]:
    keys = sorted(state)
    base = "model" if ext == "safetensors" else "pytorch_model"
    weight_map: dict[str, str] = {}
    for i in range(n):
        name = f"{base}-{i + 1:05d}-of-{n:05d}.{ext}"
        part = {k: state[k] for k in keys[i::n]}
        _save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 1234}, "weight_map": weight_map}
    (folder / f"{base}.{ext}.index.json").write_text(json.dumps(index))
    return weight_map


@pytest.mark.parametrize("ext,fmt", [("safetensors", "safetensors"), ("bin", "torch")])
def test_hf_sharded_folder_is_merged(tmp_path: Path, ext: str, fmt: str) -> None:
    state = _state(15)
    _write_shards(tmp_path, state, ext)
    model = TwoModal()
    info = load_checkpoint(model, tmp_path)
    assert _same(model, state) and (info.format, info.layout) == (fmt, "hf-sharded")
    assert len(info.files) == 3
    model = TwoModal()  # the index file named directly
    info = load_checkpoint(model, tmp_path / f"{'model' if ext == 'safetensors' else 'pytorch_model'}.{ext}.index.json")
    assert _same(model, state) and info.layout == "hf-sharded"


def test_hf_sharded_with_prefix(tmp_path: Path) -> None:
    state = _state(16)
    _write_shards(tmp_path, _prefixed(state, "model."), "safetensors", n=2)
    model = TwoModal()
    info = load_checkpoint(model, tmp_path)
    assert _same(model, state) and info.stripped_prefix == "model."


def test_hf_sharded_missing_shard_and_bad_index(tmp_path: Path) -> None:
    state = _state(17)
    weight_map = _write_shards(tmp_path, state, "safetensors")
    lost = sorted(set(weight_map.values()))[1]
    (tmp_path / lost).rename(tmp_path / "elsewhere.bak")
    with pytest.raises(LoadError, match="lacks 1 of the 3 shard files") as e:
        load_checkpoint(TwoModal(), tmp_path)
    assert lost in str(e.value)
    (tmp_path / "elsewhere.bak").rename(tmp_path / lost)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = next(f for f in set(weight_map.values()) if f != weight_map[key])
    index.write_text(json.dumps(data))
    with pytest.raises(LoadError, match="does not agree with its shards"):
        load_checkpoint(TwoModal(), tmp_path)
    index.write_text("{not json")
    with pytest.raises(LoadError, match="could not be read"):
        load_checkpoint(TwoModal(), tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(LoadError, match="outside its folder"):
        load_checkpoint(TwoModal(), tmp_path)


def test_folder_without_weights_lists_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "last.ckpt").write_bytes(b"x")
    (tmp_path / "logs").mkdir()
    with pytest.raises(LoadError) as e:
        load_checkpoint(TwoModal(), tmp_path)
    msg = str(e.value)
    assert "config.json" in msg and "last.ckpt" in msg and "logs/" in msg
    assert "model.safetensors" in msg and "pytorch_model.bin.index.json" in msg
    assert "point `checkpoint` at one of those files" in msg
