"""Tests for mmdiag.loading: model specs, checkpoints and datasets."""

from __future__ import annotations

import textwrap
import uuid
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmdiag.errors import ConfigError, EvidenceError, LoadError, MmdiagError
from mmdiag.loading import (
    ArrayDataset,
    CheckpointInfo,
    DictDataset,
    build_model,
    collate,
    dataset_from_arrays,
    flatten_item,
    import_object,
    load_checkpoint,
    load_dataset,
    save_state_dict,
)


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


class TwoTower(nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.audio = nn.Linear(3, hidden)
        self.video = nn.Linear(5, hidden)
        self.head = nn.Linear(2 * hidden, 2)


def _state(hidden: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TwoTower(hidden).state_dict()


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


# --------------------------------------------------------------------------------------------
# import_object / build_model
# --------------------------------------------------------------------------------------------


def test_file_spec_with_sibling_import(tmp_path: Path) -> None:
    sib = _unique("helpers")
    _write(tmp_path / f"{sib}.py", "WIDTH = 7\n")
    _write(
        tmp_path / "net.py",
        f"""
        import torch.nn as nn
        from {sib} import WIDTH

        def build():
            return nn.Linear(2, WIDTH)
        """,
    )
    model = build_model(f"{tmp_path / 'net.py'}:build")
    assert isinstance(model, nn.Linear) and model.out_features == 7


def test_package_spec_and_dotted_attr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _unique("userpkg")
    _write(tmp_path / pkg / "__init__.py", "")
    _write(
        tmp_path / pkg / "models.py",
        """
        import torch.nn as nn

        def build(width=3):
            return nn.Linear(2, width)

        class Factory:
            @staticmethod
            def create():
                return nn.Linear(1, 1)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model(f"{pkg}.models:build").out_features == 3
    assert isinstance(build_model(f"{pkg}.models:Factory.create"), nn.Linear)
    assert import_object(f"{pkg}.models:Factory.create")().in_features == 1


def test_factory_kwargs_and_class_factory(tmp_path: Path) -> None:
    _write(
        tmp_path / "m.py",
        """
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self, width=1):
                super().__init__()
                self.fc = nn.Linear(2, width)
        """,
    )
    model = build_model(f"{tmp_path / 'm.py'}:Net", {"width": 9})
    assert model.fc.out_features == 9


def test_missing_colon() -> None:
    with pytest.raises(ConfigError, match="no ':'") as e:
        import_object("models/net.py")
    assert "models/net.py:build_model" in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="does not exist") as e:
        build_model(f"{tmp_path / 'nope.py'}:build")
    assert "nope.py" in str(e.value)


def test_missing_attr_suggests_closest(tmp_path: Path) -> None:
    _write(tmp_path / "m.py", "def build_model():\n    pass\n\ndef other():\n    pass\n")
    with pytest.raises(LoadError) as e:
        import_object(f"{tmp_path / 'm.py'}:bulid_model")
    msg = str(e.value)
    assert "'bulid_model'" in msg and "Did you mean 'build_model'?" in msg
    assert "other" in msg


def test_module_not_importable(tmp_path: Path) -> None:
    missing = _unique("no_such_module")
    with pytest.raises(LoadError, match=missing):
        import_object(f"{missing}.sub:build")
    _write(tmp_path / "bad.py", f"import {missing}\n")
    with pytest.raises(LoadError, match="ModuleNotFoundError") as e:
        import_object(f"{tmp_path / 'bad.py'}:x")
    assert missing in str(e.value)


def test_factory_raises(tmp_path: Path) -> None:
    _write(tmp_path / "m.py", "def build(width):\n    raise ValueError('width too big')\n")
    with pytest.raises(LoadError) as e:
        build_model(f"{tmp_path / 'm.py'}:build", {"width": 3})
    msg = str(e.value)
    assert "build" in msg and "width=3" in msg
    assert f"ValueError at {tmp_path / 'm.py'}:2: width too big" in msg  # the line in the user's file


def test_factory_returns_non_module(tmp_path: Path) -> None:
    _write(tmp_path / "m.py", "def build():\n    return {'not': 'a model'}\n")
    with pytest.raises(LoadError, match="returned a builtins.dict, expected a torch.nn.Module"):
        build_model(f"{tmp_path / 'm.py'}:build")


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def test_plain_state_dict(tmp_path: Path) -> None:
    state = _state(seed=1)
    torch.save(state, tmp_path / "w.pt")
    model = TwoTower()
    info = load_checkpoint(model, tmp_path / "w.pt")
    assert isinstance(info, CheckpointInfo)
    assert (info.format, info.wrapper, info.stripped_prefix, info.n_tensors) == ("torch", None, None, 6)
    assert _same(model, state)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "net"])
def test_wrapped_state_dict(tmp_path: Path, key: str) -> None:
    state = _state(seed=2)
    torch.save({key: state, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "w.pt")
    model = TwoTower()
    info = load_checkpoint(model, str(tmp_path / "w.pt"))
    assert info.wrapper == key and _same(model, state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_prefix_stripped(tmp_path: Path, prefix: str) -> None:
    state = _state(seed=3)
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, tmp_path / "w.pt")
    model = TwoTower()
    info = load_checkpoint(model, tmp_path / "w.pt")
    assert info.stripped_prefix == prefix and _same(model, state)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    state = _state(seed=4)
    shared = torch.arange(6.0)
    state_with_views = dict(state)
    save_state_dict(state, tmp_path / "w.safetensors")
    model = TwoTower()
    info = load_checkpoint(model, tmp_path / "w.safetensors")
    assert info.format == "safetensors" and _same(model, state)
    # shared storage and non-contiguous tensors are cloned rather than rejected
    state_with_views.update(a=shared, b=shared[:3], c=torch.ones(3, 4).t())
    save_state_dict(state_with_views, tmp_path / "v.safetensors")
    from safetensors.torch import load_file

    back = load_file(str(tmp_path / "v.safetensors"))
    assert torch.equal(back["b"], shared[:3]) and torch.equal(back["c"], torch.ones(4, 3))
    assert not list(tmp_path.glob("*.tmp"))


def test_save_state_dict_torch_atomic(tmp_path: Path) -> None:
    state = _state(seed=5)
    target = tmp_path / "w.pt"
    target.write_bytes(b"old")
    save_state_dict(state, target)
    assert not list(tmp_path.glob("*.tmp"))
    model = TwoTower()
    load_checkpoint(model, target)
    assert _same(model, state)


def test_full_module_pickle_needs_trust(tmp_path: Path) -> None:
    torch.manual_seed(6)
    saved = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.save(saved, tmp_path / "full.pt")
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(LoadError) as e:
        load_checkpoint(model, tmp_path / "full.pt")
    msg = str(e.value)
    assert "full.pt" in msg and "`trust=True`" in msg and "run code" in msg
    info = load_checkpoint(model, tmp_path / "full.pt", trust=True)
    assert info.format == "module-pickle" and _same(model, saved.state_dict())


def test_torchscript_needs_trust(tmp_path: Path) -> None:
    torch.manual_seed(7)
    saved = nn.Linear(3, 4)
    torch.jit.save(torch.jit.script(saved), str(tmp_path / "ts.pt"))
    model = nn.Linear(3, 4)
    with pytest.raises(LoadError, match="TorchScript") as e:
        load_checkpoint(model, tmp_path / "ts.pt")
    assert "`trust=True`" in str(e.value)
    info = load_checkpoint(model, tmp_path / "ts.pt", trust=True)
    assert info.format == "torchscript" and _same(model, saved.state_dict())


class _Hostile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # unpickling would create (truncate) the target file
        return (open, (self.target, "w"))


@pytest.mark.parametrize("style", ["zip", "legacy", "plain-pickle"])
def test_hostile_pickle_refused_and_not_run(tmp_path: Path, style: str) -> None:
    marker = tmp_path / "pwned.txt"
    payload = {"weight": _Hostile(str(marker))}
    path = tmp_path / "evil.pt"
    if style == "zip":
        torch.save(payload, path)
    elif style == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        import pickle

        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(LoadError) as e:
        load_checkpoint(nn.Linear(1, 1), path)
    assert not marker.exists()
    msg = str(e.value)
    assert "evil.pt" in msg
    if style != "plain-pickle":
        assert "`trust=True`" in msg and "io.open" in msg
    else:  # not a torch.save file at all
        assert "could not be read" in msg


def test_mismatch_message(tmp_path: Path) -> None:
    state = _state(hidden=5)
    state["extra.weight"] = torch.zeros(2)
    del state["head.bias"]
    torch.save(state, tmp_path / "w.pt")
    model = TwoTower(hidden=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadError) as e:
        load_checkpoint(model, tmp_path / "w.pt")
    msg = str(e.value)
    assert "w.pt" in msg
    assert "1 model key(s) missing" in msg and "head.bias" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "audio.weight: checkpoint (5, 3) vs model (4, 3)" in msg
    assert "Check that `model` builds the same architecture" in msg
    assert _same(model, before)  # nothing was loaded


def test_mismatch_non_strict_loads_what_fits(tmp_path: Path) -> None:
    state = _state(hidden=4, seed=8)
    state["audio.weight"] = torch.zeros(9, 3)
    state["extra"] = torch.zeros(1)
    del state["head.bias"]
    torch.save(state, tmp_path / "w.pt")
    model = TwoTower(hidden=4)
    info = load_checkpoint(model, tmp_path / "w.pt", strict=False)
    assert info.missing == ("head.bias",)
    assert info.unexpected == ("extra",)
    assert info.mismatched == ("audio.weight",)
    assert torch.equal(model.video.weight, state["video.weight"])


def test_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="does not exist"):
        load_checkpoint(nn.Linear(1, 1), tmp_path / "missing.pt")


@pytest.mark.parametrize("kind", ["half-zip", "random", "half-safetensors", "empty"])
def test_corrupted_checkpoint(tmp_path: Path, kind: str) -> None:
    good = tmp_path / ("good.safetensors" if "safetensors" in kind else "good.pt")
    save_state_dict(_state(), good)
    bad = tmp_path / ("bad" + good.suffix)
    data = good.read_bytes()
    if kind == "random":
        rng = np.random.default_rng(0)
        data = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif kind == "empty":
        data = b""
    else:
        data = data[: len(data) // 2]
    bad.write_bytes(data)
    with pytest.raises(LoadError) as e:
        load_checkpoint(TwoTower(), bad)
    msg = str(e.value)
    assert str(bad) in msg and "could not be read as a PyTorch or safetensors checkpoint" in msg
    assert "truncated or corrupted" in msg


def test_many_random_files_never_ask_for_trust(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(30):
        p = tmp_path / f"r{i}.bin"
        p.write_bytes(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
        with pytest.raises(LoadError, match="truncated or corrupted"):
            load_checkpoint(TwoTower(), p)


def test_torchscript_zip_detected_by_contents(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
    with zipfile.ZipFile(tmp_path / "ts.pt") as z:
        assert any(n.endswith("constants.pkl") for n in z.namelist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "dispatching to torch.jit.load" warning either
        load_checkpoint(nn.Linear(2, 2), tmp_path / "ts.pt", trust=True)


# --------------------------------------------------------------------------------------------
# datasets: formats
# --------------------------------------------------------------------------------------------


def _arrays(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "audio": rng.normal(size=(n, 3)),
        "video": rng.normal(size=(n, 2, 2)).astype(np.float32),
        "label": np.arange(n) % 3,
    }


@pytest.mark.parametrize("label_key", ["label", "labels"])
def test_npz(tmp_path: Path, label_key: str) -> None:
    arrays = _arrays()
    arrays[label_key] = arrays.pop("label")
    arrays["ood"] = np.array([0, 1, 0, 0, 1, 0])
    arrays["index"] = np.arange(100, 106)
    np.savez(tmp_path / "d.npz", **arrays)
    ds, mods = load_dataset(str(tmp_path / "d.npz"))
    assert isinstance(ds, ArrayDataset) and mods == ("audio", "video") == ds.modalities
    assert len(ds) == 6 and ds.n_classes == 3 and ds.dropped == 0
    item = ds[4]
    assert set(item) == {"audio", "video", "label", "ood", "index"}
    assert item["audio"].dtype == torch.float32 and item["audio"].shape == (3,)
    assert item["video"].shape == (2, 2)
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0 and int(item["label"]) == 1
    assert bool(item["ood"]) and int(item["index"]) == 104
    np.testing.assert_array_equal(ds.labels, np.arange(6) % 3)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["audio"].shape == (4, 3) and batch["label"].shape == (4,)


def test_npz_modalities_selected_and_num_classes(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["text"] = np.ones((6, 4))
    np.savez(tmp_path / "d.npz", **arrays)
    ds, mods = load_dataset(str(tmp_path / "d.npz"), ["video", "text"], num_classes=5)
    assert mods == ("video", "text") and set(ds[0]) == {"video", "text", "label"}
    assert ds.n_classes == 5


def test_pt_data(tmp_path: Path) -> None:
    arrays = {k: torch.as_tensor(v) for k, v in _arrays().items()}
    arrays["label"] = arrays["label"].float()  # whole-number floats are accepted and cast
    torch.save(arrays, tmp_path / "d.pt")
    ds, mods = load_dataset(str(tmp_path / "d.pt"))
    assert mods == ("audio", "video") and len(ds) == 6
    assert ds[2]["label"].dtype == torch.int64 and int(ds[2]["label"]) == 2


_DATA_FACTORIES = """
import torch
from torch.utils.data import Dataset, DataLoader

class Pairs(Dataset):
    def __init__(self, n=5, nan_at=None):
        self.n, self.nan_at = n, nan_at
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        a = torch.full((3,), float(i))
        if i == self.nan_at:
            a[0] = float("nan")
        return {"audio": a, "video": torch.ones(2) * i}, i % 2

class Dicts(Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return {"rgb": torch.zeros(2), "depth": torch.ones(1), "label": torch.tensor(i % 2),
                "ood": i == 3}

def loader(batch_size=2):
    return DataLoader(Pairs(6), batch_size=batch_size)

def one_modality():
    class One(Dataset):
        def __len__(self):
            return 2
        def __getitem__(self, i):
            return {"audio": torch.zeros(1)}, 0
    return One()

def empty():
    return Pairs(0)

def bad_items():
    return [torch.zeros(2), torch.zeros(2)]

def arrays():
    import numpy as np
    return {"a": np.zeros((3, 2)), "b": np.ones((3, 1)), "label": np.array([0, 1, 1])}
"""


@pytest.fixture()
def data_py(tmp_path: Path) -> Path:
    return _write(tmp_path / "data.py", _DATA_FACTORIES)


def test_factory_tuple_items(data_py: Path) -> None:
    ds, mods = load_dataset(f"{data_py}:Pairs", kwargs={"n": 4})
    assert isinstance(ds, DictDataset) and mods == ("audio", "video")
    item = ds[3]
    assert set(item) == {"audio", "video", "label"}
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    assert item["audio"].dtype == torch.float32
    assert len(ds) == 4 and ds.n_classes == 2
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate)))
    assert batch["video"].shape == (4, 2)


def test_factory_dict_items(data_py: Path) -> None:
    ds, mods = load_dataset(f"{data_py}:Dicts")
    assert mods == ("rgb", "depth")
    item = ds[3]
    assert set(item) == {"rgb", "depth", "label", "ood"} and bool(item["ood"])


def test_factory_dataloader_returned_as_is(data_py: Path) -> None:
    loader, mods = load_dataset(f"{data_py}:loader", kwargs={"batch_size": 3})
    assert isinstance(loader, DataLoader) and mods == ("audio", "video")
    flat = flatten_item(next(iter(loader)))
    assert flat["audio"].shape == (3, 3) and flat["label"].shape == (3,)


def test_factory_returning_arrays(data_py: Path) -> None:
    ds, mods = load_dataset(f"{data_py}:arrays")
    assert isinstance(ds, ArrayDataset) and mods == ("a", "b")


def test_factory_errors(data_py: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        load_dataset(f"{data_py}:one_modality")
    with pytest.raises(EvidenceError, match="empty"):
        load_dataset(f"{data_py}:empty")
    with pytest.raises(EvidenceError, match="expected \\(dict_of_modality_tensors, label\\)"):
        load_dataset(f"{data_py}:bad_items")
    with pytest.raises(ConfigError, match="Did you mean 'video'"):
        load_dataset(f"{data_py}:Pairs", ["audio", "vidoe"])
    with pytest.raises(LoadError, match="TypeError"):
        load_dataset(f"{data_py}:Pairs", kwargs={"nope": 1})


def test_factory_nan_error_and_skip(data_py: Path) -> None:
    ds, _ = load_dataset(f"{data_py}:Pairs", kwargs={"n": 5, "nan_at": 2})
    ds[1]
    with pytest.raises(EvidenceError, match="`nan_policy='skip'`"):
        ds[2]
    ds, _ = load_dataset(f"{data_py}:Pairs", kwargs={"n": 5, "nan_at": 2}, nan_policy="skip")
    assert len(ds) == 4 and ds.dropped == 1
    assert [float(ds[i]["video"][0]) for i in range(4)] == [0.0, 1.0, 3.0, 4.0]


# --------------------------------------------------------------------------------------------
# datasets: validation errors
# --------------------------------------------------------------------------------------------


def test_labels_missing(tmp_path: Path) -> None:
    arrays = _arrays()
    del arrays["label"]
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(EvidenceError) as e:
        load_dataset(str(tmp_path / "d.npz"))
    msg = str(e.value)
    assert msg.startswith("No labels: expected an array named 'label' or 'labels' in")
    assert "d.npz" in msg and "'audio', 'video'" in msg


def test_float_labels() -> None:
    arrays = _arrays()
    arrays["label"] = np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    assert dataset_from_arrays(arrays).labels.dtype == np.int64
    arrays["label"] = np.array([0.0, 0.5, 2.0, 0.0, 1.0, 2.0])
    with pytest.raises(EvidenceError, match="not a whole number"):
        dataset_from_arrays(arrays)


def test_negative_labels() -> None:
    arrays = _arrays()
    arrays["label"] = np.array([0, 1, -1, 0, 1, 2])
    with pytest.raises(EvidenceError, match="negative value.*-1 at index 2"):
        dataset_from_arrays(arrays)


def test_unequal_counts(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["video"] = arrays["video"][:5]
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(EvidenceError) as e:
        load_dataset(str(tmp_path / "d.npz"))
    assert "audio: 6, video: 5, label: 6" in str(e.value)


def test_empty() -> None:
    with pytest.raises(EvidenceError, match="empty"):
        dataset_from_arrays({"a": np.zeros((0, 2)), "b": np.zeros((0, 1)), "label": np.zeros(0)})


def test_one_modality() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        dataset_from_arrays({"a": np.zeros((3, 2)), "label": np.zeros(3, dtype=int)})
    with pytest.raises(ConfigError, match="at least 2"):
        dataset_from_arrays(_arrays(), ["audio"])


def test_unknown_modality_suggestion() -> None:
    with pytest.raises(ConfigError) as e:
        dataset_from_arrays(_arrays(), ["audio", "vidoe"])
    msg = str(e.value)
    assert "'vidoe'" in msg and "'audio', 'video'" in msg and "Did you mean 'video'?" in msg


def test_non_numeric() -> None:
    arrays = _arrays()
    arrays["video"] = np.array(["x"] * 6)
    with pytest.raises(EvidenceError, match="not numeric"):
        dataset_from_arrays(arrays)


def test_nan_error_and_skip(tmp_path: Path) -> None:
    arrays = _arrays(n=8)
    arrays["audio"][1, 0] = np.nan
    arrays["audio"][4, 2] = np.inf
    arrays["video"][4, 0, 0] = np.nan
    arrays["video"][6, 1, 1] = -np.inf
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(EvidenceError) as e:
        load_dataset(str(tmp_path / "d.npz"))
    msg = str(e.value)
    assert "audio: 2 samples" in msg and "video: 2 samples" in msg
    assert "use `nan_policy='skip'` to drop those samples" in msg
    ds, _ = load_dataset(str(tmp_path / "d.npz"), nan_policy="skip")
    assert ds.dropped == 3 and len(ds) == 5
    np.testing.assert_array_equal(ds.labels, (np.arange(8) % 3)[[0, 2, 3, 5, 7]])
    assert all(torch.isfinite(ds[i]["audio"]).all() for i in range(len(ds)))
    with pytest.raises(ConfigError, match="Did you mean 'skip'"):
        load_dataset(str(tmp_path / "d.npz"), nan_policy="skp")


def test_tensors_input_and_errors_are_mmdiag_errors(tmp_path: Path) -> None:
    arrays = {k: torch.as_tensor(v) for k, v in _arrays().items()}
    ds = dataset_from_arrays(arrays)
    assert ds.tensors()["audio"].shape == (6, 3)
    for bad in ("missing.npz", f"{tmp_path / 'x.py'}:f"):
        with pytest.raises(MmdiagError):
            load_dataset(bad)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="expected a .npz file"):
        load_dataset(str(tmp_path / "d.csv"))


def test_corrupted_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "good.npz", **_arrays())
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="bad.npz"):
        load_dataset(str(tmp_path / "bad.npz"))


def test_sys_path_restored_after_import(tmp_path: Path) -> None:
    import sys

    _write(tmp_path / "m.py", "x = 1\n")
    before = list(sys.path)
    assert import_object(f"{tmp_path / 'm.py'}:x") == 1
    assert sys.path == before


def test_numpy_scalars_beside_weights_need_no_trust(tmp_path: Path) -> None:
    state = _state(seed=9)
    torch.save({"state_dict": state, "best_acc": np.float64(0.75), "epoch": 3}, tmp_path / "w.pt")
    model = TwoTower()
    info = load_checkpoint(model, tmp_path / "w.pt")
    assert info.wrapper == "state_dict" and _same(model, state)
    torch.save({"state_dict": state, "hist": np.zeros(3)}, tmp_path / "a.pt")  # arrays: no
    with pytest.raises(LoadError, match="`trust=True`"):
        load_checkpoint(model, tmp_path / "a.pt")
