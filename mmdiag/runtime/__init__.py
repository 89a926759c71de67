"""Where mmdiag runs: the device, torch.distributed (one module), and user data as datasets and batches.

``analyze``, ``collect``, ``fit`` and ``rebalance`` all go through here to resolve the device,
join the process group under torchrun and ask for their rank; nothing else imports torch.distributed.
"""

from mmdiag.runtime.device import resolve_device
from mmdiag.runtime.distributed import (DistInfo, distributed_rank, is_main_process, join, leave,
                                        process_group)

__all__ = ["DistInfo", "distributed_rank", "is_main_process", "join", "leave", "process_group", "resolve_device"]
