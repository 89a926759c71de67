"""How evidence is gathered: batch size, device, seeds and the sampling of every evidence kind."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from mmdiag.errors import ConfigError
from mmdiag.validation import COLLECT, check_fields

#: progress(stage, done, total) is called as batches finish; total may be None.
ProgressFn = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class CollectSettings:
    """How evidence is gathered. Defaults keep the default suite within a few evaluation passes.

    Attributes:
        batch_size: rows per batch.
        num_workers: DataLoader worker processes.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: seeds the row order, subsamples, masks, permutations and noise.
        max_feature_samples: cap on rows whose pooled features are kept (probes, prototypes, MDI entropy).
        max_grad_samples: cap on rows used for gradient evidence.
        grad_fraction: fraction of the rows whose feature gradients (``grad_x_act``: fusion-head
            backwards on cached features, cheap) are taken (at least :data:`GRAD_FLOOR` rows, at
            most ``max_grad_samples``); 1 = up to the cap.
        param_grad_fraction: fraction of the rows whose encoder-parameter gradients
            (``param_grads``: an encoder forward and two encoder backwards per row, the costlier
            kind) are taken (at least :data:`PARAM_GRAD_FLOOR` rows, at most ``max_grad_samples``,
            and never more than the feature-gradient rows).
        param_grad_rows: rows of one batch's parameter gradients: the subsample is taken as this
            many rows from each of a seeded set of batches, so each per-batch cosine is over the
            same number of rows whatever N and the share (see
            :func:`~mmdiag.collect.sampling.pick_slices`).
        noise_fraction: fraction of the rows corrupted at every noise level (UDML's
            ``noise_features``: each row costs one encoder forward per noisy level) (at least
            :data:`~mmdiag.collect.noise.NOISE_FLOOR` rows, at most ``max_noise_samples``); 1 = up to the cap.
        max_noise_samples: cap on rows corrupted at every noise level.
        max_attribution_samples: cap on rows attributed with Integrated Gradients.
        attribution_fraction: fraction of the rows attributed (at least :data:`ATTRIBUTION_FLOOR`
            rows, at most ``max_attribution_samples``); 1 = up to the cap.
        stats_samples: rows used to estimate the mean/std masks and the data scale.
        permutations: K, permutations per modality for the perceptual score.
        noise_levels: integer noise levels; level 1 is clean. The default is every other level of
            UDML's grid 1..11 (five noisy forwards a row instead of ten; see docs/diagnostics/udml.md).
        noise_step: noise std at level l is ``noise_step * (l - 1)`` times the modality's data std.
        ig_steps: Integrated-Gradients steps of the first pass over each attributed row.
        ig_max_steps: most steps a row is refined to (steps grow 4x per round).
        ig_tolerance: a row is converged when its completeness gap |sum of attributions -
            (f(x) - f(baseline))| is at most this fraction of max(|f(x) - f(baseline)|, the
            median of that over the rows attributed together). Fixed steps: ``ig_max_steps = ig_steps``.
        max_subsets: refuse more than this many subsets (2^M) unless raised.
        pool: how encoder outputs of rank 3 and more become one vector per sample for the feature
            diagnostics: ``mean`` over the non-channel axes, ``first`` position, or ``flatten``
            (see :mod:`mmdiag.pooling`).
    """

    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    seed: int = 0
    max_feature_samples: int = 2000
    max_grad_samples: int = 2048
    grad_fraction: float = 0.125
    param_grad_fraction: float = 1 / 32
    param_grad_rows: int = 16
    noise_fraction: float = 1 / 128
    max_noise_samples: int = 1000
    max_attribution_samples: int = 256
    attribution_fraction: float = 1 / 128
    stats_samples: int = 2048
    permutations: int = 5
    noise_levels: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    noise_step: float = 0.2
    ig_steps: int = 8
    ig_max_steps: int = 128
    ig_tolerance: float = 0.05
    max_subsets: int = 256
    pool: str = "mean"

    def __post_init__(self) -> None:
        # types and ranges from the one settings schema (the same checks as [collect] and the flags)
        checked = check_fields(asdict(self), COLLECT, lambda name: f"CollectSettings.{name}")
        object.__setattr__(self, "noise_levels", checked["noise_levels"])
        if int(self.ig_max_steps) < int(self.ig_steps):
            raise ConfigError(f"ig_max_steps ({self.ig_max_steps}) must be at least ig_steps ({self.ig_steps}).")
