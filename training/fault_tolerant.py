"""One replica of a fault-tolerant job (train_ddp.py --fault-tolerance): training that goes on
when replicas die or join, without restarting the survivors and without reading a checkpoint.

    python -m training.quorum --port-file /tmp/port --min-replicas 2 --expect-replicas 3 &
    OMP_NUM_THREADS=1 python train_ddp.py --fault-tolerance --coordinator 127.0.0.1:PORT \\
        --replica-id 0 --out-dir runs/ft   # and --replica-id 1, 2 (launch/fault_tolerant.sh)

Each replica is a torchrun job of one process (more ranks per replica are refused). Before
every optimizer step it asks the coordinator (training/quorum.py) for the step's quorum and
then, in this order:
1. if the quorum id changed, it builds a fresh gloo process group over the members, on
   PrefixStore(f"quorum{id}") of the coordinator's store (no stale keys from a dead group);
2. if a member is behind the quorum's step (a newcomer, or a replica whose last step failed
   where a peer's succeeded), the source member broadcasts its whole state over that group,
   serialized with torch.save and read back with weights_only=True: parameters, optimizer
   and scheduler state, step, epoch, data cursor, RNG state. Not from disk;
3. it computes its gradient, all-reduces the gradients across the quorum and steps.
A collective that fails (a peer was killed: gloo raises at once; a peer hangs: --ft-timeout)
discards the step's gradients, and the step is redone under the next quorum.

Semantics, exactly. An epoch's samples are one permutation of the training set, drawn from
--seed + epoch (as DistributedSampler draws it), consumed through a cursor that every replica
holds (and a newcomer receives). A step whose quorum has m members takes the next
m x --batch-size samples of the permutation; the member at index i of the membership sorted by
incarnation takes perm[cursor + i*B : cursor + (i+1)*B]. The step's gradient is the average
over those m x B samples (each replica's mean loss, all-reduced and divided by m), so a step
of m replicas equals one process taking a batch of m x B. The cursor moves by m x B only when
the step commits; a failed step is redone from the same cursor by the new quorum, so within an
epoch no sample is skipped or seen twice. The epoch ends when fewer than m x B samples are
left (they are dropped, as with drop_last). --max-steps counts optimizer steps whatever their
m; --epochs counts passes over the permutation.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from core.dist import resolve
from core.errors import UsageError
from data.datasets import build_datasets
from data.sampling import eval_loader
from training.checkpoint import param_checksum
from training.checkpoint.files import atomic_write
from training.faults import fault_hook, heal_fault, hold_until_released, slow_down
from training.metrics import evaluate, loss_fn
from training.models import model_from_args, model_input
from training.optim import make_optimizer, make_scheduler
from training.quorum import QuorumClient, QuorumLost

# Failed steps in a row (each under a new quorum) before a replica gives up: a collective
# that fails again and again with the same peers is a bug, not a lost replica.
MAX_FAILED_IN_A_ROW = 20

# Flags whose machinery the fault-tolerant loop does not run: refused in one line, not ignored.
UNSUPPORTED = {
    "resume": None,
    "save_every": 0,
    "grad_accum": 1,
    "sync": "ddp",
    "amp": "none",
    "compile": False,
    "trace_comm": False,
    "profile": False,
    "sync_bn": False,
    "activation_checkpointing": False,
    "clip_grad_norm": 0.0,
    "workers": 0,
    "download": False,
}


def check_flags(args: argparse.Namespace, world_size: int) -> None:
    if world_size != 1:
        raise UsageError(
            f"--fault-tolerance runs one process per replica (got WORLD_SIZE {world_size}): "
            "start each replica as torchrun --nproc-per-node 1"
        )
    if not args.coordinator:
        raise UsageError(
            "--fault-tolerance needs --coordinator HOST:PORT (python -m training.quorum)"
        )
    for name, default in UNSUPPORTED.items():
        if getattr(args, name, default) != default:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} does not combine with --fault-tolerance")
    if args.lr_schedule == "cosine" and not args.max_steps:
        raise UsageError(
            "--lr-schedule cosine with --fault-tolerance needs --max-steps: the number of "
            "steps an epoch takes depends on how many replicas are alive"
        )


@dataclass
class Position:
    """Where the job is: what every member of a quorum holds the same."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0  # samples of this epoch's permutation consumed by committed steps


@dataclass
class Replica:
    """The state one replica trains and, as a source, hands to a newcomer."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    at: Position = field(default_factory=Position)

    def state_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "position": [self.at.step, self.at.epoch, self.at.cursor],
                "rng": torch.get_rng_state(),
            },
            buf,
        )
        return buf.getvalue()

    def load_bytes(self, data: bytes) -> None:
        state = torch.load(io.BytesIO(data), weights_only=True)  # a peer's bytes: no pickle
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.at = Position(*state["position"])
        torch.set_rng_state(state["rng"])


def heal(
    group: dist.ProcessGroup, replica: Replica, me: int, source: int, behind: bool, rid: int
) -> None:
    """Broadcast the source's state over the quorum's group; a member that is `behind` takes
    it. The bytes are applied only once all have arrived: a source that dies mid-way leaves
    the receiver as it was."""
    size = torch.zeros(1, dtype=torch.int64)
    data = replica.state_bytes() if me == source else b""
    size[0] = len(data)
    group.broadcast(size, source).wait()
    if me == source:
        heal_fault(rid)  # TRAIN_HEAL_FAULT: tests kill a source here
    buf = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if me == source
        else torch.empty(int(size), dtype=torch.uint8)
    )
    group.broadcast(buf, source).wait()
    if behind:
        replica.load_bytes(buf.numpy().tobytes())


def all_reduce_gradients(
    group: dist.ProcessGroup, params: list[torch.nn.Parameter], loss: torch.Tensor, m: int
) -> float:
    """Average the gradients over the quorum's m replicas in one flat all-reduce. A parameter
    that got no gradient on any replica keeps grad None (not stepped, as in DDP); the step's
    mean loss rides along. Returns that loss."""
    dtype = params[0].dtype
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        + [torch.tensor([float(p.grad is not None) for p in params], dtype=dtype)]
        + [loss.detach().reshape(1).to(dtype)]
    )
    group.allreduce([flat]).wait()
    flat /= m
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        present = flat[-1 - len(params) + i] > 0
        p.grad = flat[offset : offset + n].view_as(p).clone() if present else None
        offset += n
    return float(flat[-1])


def new_group(store: dist.Store, quorum: dict, me: int, timeout: float) -> dist.ProcessGroup:
    """A gloo group of the quorum's members, on keys no other quorum uses."""
    prefix = dist.PrefixStore(f"quorum{quorum['quorum']}", store)
    return dist.ProcessGroupGloo(prefix, me, len(quorum["members"]), timedelta(seconds=timeout))


def run_replica(args: argparse.Namespace) -> dict:
    """train_ddp.py's main() with --fault-tolerance: this replica's whole run. Returns its
    summary (also written to --out-dir/replica-<id>/summary.json)."""
    env = resolve("gloo")
    check_flags(args, env.world_size)
    label = str(args.replica_id)
    say = lambda line: print(f"replica {label}: {line}", flush=True)
    dtype = getattr(torch, args.dtype)
    data = build_datasets(
        args.dataset,
        args.data_dir,
        seed=args.seed,
        train_size=args.train_size,
        eval_size=args.eval_size,
        augment=args.augment,
        trust_files=args.trust_data_dir,
        context=args.context,
    )
    torch.manual_seed(args.seed)  # the same initial model on every replica
    model = model_from_args(args, data).to(env.device, dtype)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, args.max_steps)
    replica = Replica(model, optimizer, scheduler)
    params = [p for p in model.parameters() if p.requires_grad]
    fault = fault_hook(args.replica_id)  # TRAIN_FAULT=kill:<replica id>:<step>, tests only
    n, batch = len(data.train), args.batch_size

    hold_until_released()  # TRAIN_JOIN_AFTER: a test makes this replica join later
    client = QuorumClient(args.coordinator, label, args.quorum_timeout)
    group, group_id, broken, failed = None, None, False, 0
    history, loss_value, perm, perm_epoch = [], float("nan"), None, None
    say(f"incarnation #{client.inc}, coordinator {args.coordinator}")
    while True:
        quorum = client.quorum(replica.at.step, broken=broken)
        members, me = quorum["members"], quorum["members"].index(client.inc)
        source = members.index(quorum["source"])
        behind = replica.at.step < quorum["step"]
        broken = False
        try:
            if quorum["quorum"] != group_id:
                group, group_id = None, None  # the old group's sockets close with it
                group = new_group(client.store, quorum, me, args.ft_timeout)
                group_id = quorum["quorum"]
                say(f"quorum {group_id}: replicas {quorum['labels']} from step {quorum['step']}")
            if any(s < quorum["step"] for s in quorum["steps"]):
                heal(group, replica, me, source, behind, args.replica_id)
                if behind:
                    say(f"healed from replica {quorum['labels'][source]} at step {replica.at.step}")
        except RuntimeError as e:  # a member died or hung while the group formed or healed
            broken, failed = True, failed + 1
            say(f"quorum {quorum['quorum']} failed ({str(e).splitlines()[0]}); asking again")
            check_failures(failed)
            continue
        at = replica.at
        if (args.max_steps and at.step >= args.max_steps) or at.epoch >= args.epochs:
            break  # every member decides this from the same position, after healing
        m = len(members)
        if at.cursor + m * batch > n:  # the epoch's rest is smaller than a step: dropped
            at.epoch, at.cursor = at.epoch + 1, 0
            continue
        if perm_epoch != at.epoch:
            generator = torch.Generator().manual_seed(args.seed + at.epoch)
            perm, perm_epoch = torch.randperm(n, generator=generator), at.epoch
        start = at.cursor + me * batch
        images, labels = default_collate([data.train[int(i)] for i in perm[start : start + batch]])
        images = model_input(images, env.device, dtype)
        model.train()
        loss = loss_fn(model(images).to(dtype), labels.to(env.device))
        loss.backward()
        slow_down("reduce")  # TRAIN_SLOW=reduce:S, tests only: a kill in the middle of a step
        try:
            loss_value = all_reduce_gradients(group, params, loss, m)
        except RuntimeError as e:  # a peer died mid-step: discard, ask for a new quorum
            optimizer.zero_grad(set_to_none=True)
            broken, failed = True, failed + 1
            say(f"step {at.step + 1} discarded ({str(e).splitlines()[0]}); redoing it")
            check_failures(failed)
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        history.append([at.step + 1, at.epoch, at.cursor, m, group_id])
        at.step, at.cursor, failed = at.step + 1, at.cursor + m * batch, 0
        if at.step % args.log_every == 0:
            say(f"step {at.step} epoch {at.epoch} loss {loss_value:.4f} replicas {m}")
        fault(at.step)

    client.close()
    group = None
    metrics = {}
    if not args.no_eval:
        evaluation = eval_loader(data.eval, batch, rank=0, world_size=1, workers=0)
        metrics = evaluate(model, evaluation, env.device, dtype)
    summary = {
        "replica": label,
        "steps": replica.at.step,
        "epochs": replica.at.epoch,
        "final_loss": loss_value,
        "param_checksum": param_checksum(model),
        "eval": metrics,
        "history": history,  # [step, epoch, cursor, replicas, quorum id] of each step it took
        "dtype": args.dtype,
    }
    out = Path(args.out_dir) / f"replica-{label}"
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write(out / "model.pt", buf.getvalue())  # for the tests' oracle
    atomic_write(out / "summary.json", json.dumps(summary, indent=1).encode())
    say(f"done: {replica.at.step} steps, loss {loss_value:.4f}")
    return summary


def check_failures(failed: int) -> None:
    if failed > MAX_FAILED_IN_A_ROW:
        raise QuorumLost(f"{failed} steps in a row failed under new quorums; giving up")
