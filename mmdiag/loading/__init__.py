"""Loading users' models, checkpoints and datasets.

This module turns the strings a user types (``--model net.py:build``, ``--checkpoint best.pt``,
``--data val.npz``) into Python objects, and it checks what it loads before anything else sees it:
a checkpoint whose keys or shapes do not fit the model, labels that are not class indices, NaN in
an input, a dataset with a single modality. Every problem is raised as an
:class:`~mmdiag.errors.MmdiagError` subclass whose one-paragraph message names the file, says what
was expected, what was found and what to try:

* :class:`~mmdiag.errors.LoadError` -- a file or an import could not be loaded;
* :class:`~mmdiag.errors.ConfigError` -- a spec or an argument is malformed;
* :class:`~mmdiag.errors.EvidenceError` -- the data loaded but its contents are not usable.

Nothing here prints: functions take Python objects and return data or raise.

Checkpoints are files or Hugging Face style folders in the layouts of
:mod:`mmdiag.loading.layouts` (a bare state dict, a wrapper dict, a Lightning ``.ckpt``, DDP and
``torch.compile`` prefixes, sharded weights). They are read with ``torch.load(weights_only=True)``
(or safetensors), which cannot run code. Anything that needs real unpickling -- a pickled
``nn.Module``, a TorchScript archive, a checkpoint holding arbitrary Python objects -- is refused
unless the caller passes ``trust=True`` (``--trust-checkpoint`` on the command line).
"""

from __future__ import annotations

from mmdiag.loading.checkpoints import (
    TRUST_HINT,
    CheckpointInfo,
    checkpoint_settings,
    load_checkpoint,
    save_state_dict,
)
from mmdiag.loading.arrays import EXTRA_KEYS, LABEL_KEYS, NAN_POLICIES, ArrayDataset, collate, dataset_from_arrays
from mmdiag.loading.data import DictDataset, flatten_item, load_dataset
from mmdiag.loading.models import build_model, import_object

__all__ = [
    "ArrayDataset",
    "CheckpointInfo",
    "DictDataset",
    "EXTRA_KEYS",
    "LABEL_KEYS",
    "NAN_POLICIES",
    "TRUST_HINT",
    "build_model",
    "checkpoint_settings",
    "collate",
    "dataset_from_arrays",
    "flatten_item",
    "import_object",
    "load_checkpoint",
    "load_dataset",
    "save_state_dict",
]

