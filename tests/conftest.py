import os

import torch

# one thread: tiny test models spin badly with more on a loaded 2-core machine
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")
