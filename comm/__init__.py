"""The communication layer: process-group setup, communicate(), sync strategies and the
communication study (collectives tour, ring all-reduce, tracer, benchmark).

`from comm import communicate` gives the function, the repository's signature routine (one
collective over many tensors). Its module stays importable by name for the rest of it:
`from comm.communicate import communicate_async, flatten, plan_buckets`.
"""

from comm.communicate import communicate, communicate_async

__all__ = ["communicate", "communicate_async"]
