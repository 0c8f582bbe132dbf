"""One name for collectives that were renamed between the torch versions we support (2.11+).

torch 2.14 renamed `all_gather_into_tensor` to `all_gather_single` and
`reduce_scatter_tensor` to `reduce_scatter_single`, and the old names now warn. Use these.
"""

import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
