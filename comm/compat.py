"""One name for collectives that were renamed between the torch versions we support (2.11+).

torch 2.14 renamed `all_gather_into_tensor` to `all_gather_single` and
`reduce_scatter_tensor` to `reduce_scatter_single`, and the old names now warn. Use these.

Each looks the function up in torch.distributed when called, not when imported, so that
`from comm.compat import all_gather_single` still goes through whatever torch.distributed
holds at that moment (comm/tracer.py wraps the functions there to record them).
"""

import torch.distributed as dist


def all_gather_single(output_tensor, input_tensor, group=None, async_op=False):
    """Gather every rank's `input_tensor` into `output_tensor`, concatenated in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output_tensor, input_tensor, group=group, async_op=async_op)


def reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """Reduce `input` across ranks and keep this rank's 1/world_size slice in `output`."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(output, input, op=op, group=group, async_op=async_op)
