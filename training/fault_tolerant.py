"""One replica of a fault-tolerant job (train_ddp.py --fault-tolerance): training that goes on
when replicas die or join, without restarting the survivors and without reading a checkpoint.

    python -m training.quorum --port-file /tmp/port --min-replicas 2 --expect-replicas 3 &
    OMP_NUM_THREADS=1 python train_ddp.py --fault-tolerance --coordinator 127.0.0.1:PORT \\
        --replica-id 0 --out-dir runs/ft   # and --replica-id 1, 2 (launch/fault_tolerant.sh)

Each replica is a torchrun job of R processes (--nproc-per-node R, the same R for all), and
a rank that dies takes its replica with it (its torchrun restarts the replica whole). Before
every optimizer step the replica's rank 0 asks the coordinator (training/quorum.py) for the
step's quorum, hands the answer to its other ranks, and then, in this order:
1. if the quorum id changed, each rank r builds a fresh gloo process group with rank r of the
   other members, on PrefixStore(f"quorum{id}/rank{r}") of the coordinator's store (no stale
   keys from a dead group);
2. if a member is behind the quorum's step (a newcomer, or a replica whose last step failed
   where a peer's succeeded), the source member broadcasts its whole state over those groups,
   serialized with torch.save and read back with weights_only=True: parameters, optimizer
   and scheduler state, step, epoch, data cursor, RNG state. Not from disk;
3. it computes its gradient, sums it over its own ranks, all-reduces the sums across the
   quorum and steps.
A collective among replicas that fails (a peer was killed: gloo raises at once; a peer hangs:
--ft-timeout) discards the step's gradients, and the step is redone under the next quorum.
The replica's ranks vote after each such collective, so that they commit, heal or redo
together.

Semantics, exactly. An epoch's samples are one permutation of the training set, drawn from
--seed + epoch (as DistributedSampler draws it), consumed through a cursor that every replica
holds (and a newcomer receives). With R ranks per replica and B = --batch-size (per rank), a
step whose quorum has m members takes the next m x R x B samples of the permutation, in
slices of B: rank r of the member at index i of the membership sorted by incarnation takes
slice i*R + r, perm[cursor + (i*R + r)*B : cursor + (i*R + r + 1)*B]. The step's gradient is
the average over those m x R x B samples (each process's mean loss, summed and divided by
m x R), so the step equals one process's on a batch of m x R x B. The cursor moves only when
the step commits; a failed step is redone from the same cursor by the new quorum, so within
an epoch no sample is skipped or seen twice. The epoch ends when fewer than a step's samples
are left (they are dropped, as with drop_last). --max-steps counts optimizer steps whatever
their m; --epochs counts passes over the permutation.

Stops and checkpoints. SIGTERM or SIGINT to any rank (launch/fault_tolerant.sh passes its own
on to every rank) stops the whole job as training/preempt.py stops a ddp run: the replica's
ranks agree on it after their step, rank 0 puts it in its next quorum request, and the
coordinator makes that quorum the last for all its members (training/quorum.py). At that
boundary, after healing, the quorum's index-0 member writes the job's checkpoint (its rank 0,
through training/checkpoint: atomic, --out-dir/checkpoints/step-N.pt and checkpoint.pt) and
every replica exits 0. The same member also writes one every --save-every steps, after the
step commits, and at the end of the run. The file is a ddp checkpoint (model, optimizer,
scheduler, RNG states, epoch, step) whose position is also `fault_tolerant`: {"cursor",
"replicas"}; --resume auto|PATH starts every replica of a fresh job from it (with any
membership: the cursor says where the epoch's permutation goes on). A ddp checkpoint is
refused in FT mode and an FT one by a ddp run (their positions mean different things).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from core.dist import DistEnv, rendezvous, resolve
from core.errors import UsageError
from data.datasets import build_datasets
from data.sampling import eval_loader
from training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    param_checksum,
    restore_training_state,
    training_state,
)
from training.checkpoint.files import atomic_write
from training.checkpoint.resume import TRAJECTORY_FLAGS, check_same_flags
from training.checkpoint.schema import check_counters
from training.cli import check_model_data
from training.faults import fault_hook, heal_fault, hold_until_released, slow_down
from training.metrics import evaluate, loss_fn
from training.models import model_from_args, model_input
from training.optim import make_optimizer, make_scheduler
from training.preempt import Preemption
from training.quorum import QuorumClient, QuorumLost, connect
from training.runlog import check_writable

# Failed steps in a row (each under a new quorum) before a replica gives up: a collective
# that fails again and again with the same peers is a bug, not a lost replica.
MAX_FAILED_IN_A_ROW = 20

# Flags whose machinery the fault-tolerant loop does not run: refused in one line, not ignored.
UNSUPPORTED = {
    "async_save": False,  # the index-0 member writes synchronously, at a step boundary
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
    # Flags the replica's own loop would ignore: it writes no sample, and its all-reduce
    # among replicas is gloo's, uncompressed, over every parameter.
    "sample": 0,
    "backend": None,
    "sync_every": None,
    "find_unused_parameters": False,
    "transport": "gloo",
    "param_dtype": None,
    "reduce_dtype": None,
    "topology": None,
    "inter_node_gbps": None,
    "comm_hook": "none",
    "compress": "none",
}


def check_flags(args: argparse.Namespace) -> None:
    if not args.coordinator:
        raise UsageError(
            "--fault-tolerance needs --coordinator HOST:PORT (python -m training.quorum)"
        )
    for name, default in UNSUPPORTED.items():
        if getattr(args, name, default) != default:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} does not combine with --fault-tolerance")
    check_model_data(args)  # the replica skips validate(): --model gpt on images, ...
    if args.lr_schedule == "cosine" and not args.max_steps:
        raise UsageError(
            "--lr-schedule cosine with --fault-tolerance needs --max-steps: the number of "
            "steps an epoch takes depends on how many replicas are alive"
        )


def check_out_dir(args: argparse.Namespace) -> None:
    """This replica's folder, --out-dir/replica-<id>/, at the start rather than after the run:
    a place that cannot be written, or a previous run's results there without --resume (which
    goes on from the folder's checkpoint) or --overwrite (which replaces them at the end), is
    one line."""
    out_dir = Path(args.out_dir)
    check_writable(out_dir)
    previous = out_dir / f"replica-{args.replica_id}" / "summary.json"
    if previous.exists() and not (args.overwrite or args.resume):
        raise UsageError(
            f"--out-dir {out_dir} holds a previous run of replica {args.replica_id} "
            f"({previous}): --resume auto to go on from its checkpoint, --overwrite to "
            "replace it, or choose another --out-dir"
        )


def check_replicas(
    parse: Callable[[list[str]], argparse.Namespace], replicas: int, flags: list[str]
) -> None:
    """What each of a job's replicas checks at its start (check_flags, then its rank 0's
    check_out_dir), for all of them at once: launch/fault_tolerant.sh runs it before it starts
    the coordinator, so that a refused flag is one line and exit status 2 rather than one line
    from every replica at each of its torchrun's restarts. `parse` is train_ddp.py's
    parse_args; `flags` what the script passes on to the replicas, after the same
    --fault-tolerance --coordinator --replica-id (the coordinator's address a placeholder: it
    does not listen yet)."""
    for i in range(replicas):
        argv = ["--fault-tolerance", "--coordinator", "127.0.0.1:1", "--replica-id", str(i)]
        args = parse([*argv, *flags])
        check_flags(args)
        check_out_dir(args)


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
    group: dist.ProcessGroup, replica: Replica, me: int, source: int, rid: int
) -> bytes | None:
    """Broadcast the source's state over the quorum's group; the others get it as bytes, to
    apply once every rank of their replica has received all of its own (a source that dies
    mid-way leaves the receivers as they were)."""
    size = torch.zeros(1, dtype=torch.int64)
    data = replica.state_bytes() if me == source else b""
    size[0] = len(data)
    group.broadcast(size, source).wait()
    if me == source:
        heal_fault(rid)  # TRAIN_HEAL_FAULT: tests kill a source here
        group.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), source).wait()
        return None
    buf = torch.empty(int(size), dtype=torch.uint8)
    group.broadcast(buf, source).wait()
    return buf.numpy().tobytes()


def pack(params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """The step's gradients, a has-a-gradient flag per parameter and the loss, in one buffer
    for one all-reduce."""
    dtype = params[0].dtype
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        + [torch.tensor([float(p.grad is not None) for p in params], dtype=dtype)]
        + [loss.detach().reshape(1).to(dtype)]
    )


def unpack(flat: torch.Tensor, params: list[torch.nn.Parameter], count: int) -> float:
    """The summed buffer divided by the `count` processes that filled it: the gradients become
    the average; a parameter that got no gradient anywhere keeps grad None (not stepped, as in
    DDP). Returns the step's mean loss."""
    flat /= count
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        present = flat[-1 - len(params) + i] > 0
        p.grad = flat[offset : offset + n].view_as(p).clone() if present else None
        offset += n
    return float(flat[-1])


def new_group(
    store: dist.Store, quorum: dict, me: int, rank: int, timeout: float
) -> dist.ProcessGroup:
    """A gloo group of the quorum's members' local rank `rank`, on keys no other quorum (and
    no other local rank) uses."""
    prefix = dist.PrefixStore(f"quorum{quorum['quorum']}/rank{rank}", store)
    return dist.ProcessGroupGloo(prefix, me, len(quorum["members"]), timedelta(seconds=timeout))


def everywhere(ok: bool, ranks: int) -> bool:
    """True when `ok` holds on every rank of this replica (a vote over its own group), so
    that its ranks commit, heal or give up together."""
    if ranks == 1:
        return ok
    vote = torch.tensor([int(ok)])
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return bool(vote)


def run_replica(args: argparse.Namespace) -> dict:
    """train_ddp.py's main() with --fault-tolerance: this replica's whole run (each of its
    ranks runs it). Returns its summary (rank 0 also writes it to
    --out-dir/replica-<id>/summary.json)."""
    env = resolve("gloo")
    check_flags(args)
    if env.is_main:  # the replica's rank 0 writes its results
        check_out_dir(args)
    ranks = env.world_size  # the replica's own processes: torchrun --nproc-per-node
    if ranks > 1:  # the replica's own group: a rank that dies takes its replica with it
        # Its ranks wait in it while rank 0 waits for a quorum: as long as that may take.
        wait = timedelta(seconds=args.quorum_timeout + args.ft_timeout)
        dist.init_process_group("gloo", timeout=wait, **rendezvous(env))
    label = str(args.replica_id)
    say = lambda line: env.is_main and print(f"replica {label}: {line}", flush=True)
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

    checkpoints = CheckpointManager(Path(args.out_dir), args.keep, env, devices=[env.device])
    resumed = resume(checkpoints, args, replica, env, n)
    if resumed:
        at = replica.at
        say(f"resumed from {resumed} at step {at.step} (epoch {at.epoch}, cursor {at.cursor})")
    saved_at, stopped = None, None  # the step of this replica's last save; the stop's reply

    def save(m: int) -> None:
        nonlocal saved_at
        if saved_at != replica.at.step:
            path = save_checkpoint(checkpoints, args, replica, m, ranks)
            saved_at = replica.at.step
            say(f"checkpoint {path}")

    # SIGTERM, SIGINT, --preempt-signal: this replica's ranks agree after their step, and the
    # next quorum stops every member (training/preempt.py does the same for a ddp run).
    preempt = Preemption(args.preempt_signal, env)
    with preempt:
        hold_until_released()  # TRAIN_JOIN_AFTER: a test makes this replica join later
        # Rank 0 registers and heartbeats for the replica; every rank uses the store for its
        # group.
        client = QuorumClient(args.coordinator, label, args.quorum_timeout) if env.is_main else None
        store = client.store if client else connect(args.coordinator, args.quorum_timeout)
        group, group_id, broken, failed = None, None, False, 0
        history, loss_value, perm, perm_epoch = [], float("nan"), None, None
        m = 0  # the members of the last quorum
        if client:
            say(f"incarnation #{client.inc}, coordinator {args.coordinator}, {ranks} rank(s)")
        while True:
            signal_name = preempt.agreed.name if preempt.requested() else ""  # a collective
            broken = not everywhere(not broken, ranks)
            quorum = agree_on_quorum(client, replica.at.step, broken, ranks, signal_name)
            if "error" in quorum:  # too few replicas, or no coordinator: the job ends
                if quorum.get("save"):  # the one the coordinator picked saves first
                    save(m)
                raise QuorumLost(quorum["error"])
            if "stopped" in quorum:  # the job stopped at a quorum without this replica
                stopped = quorum
                break
            members, me = quorum["members"], quorum["members"].index(quorum["self"])
            source = members.index(quorum["source"])
            behind = replica.at.step < quorum["step"]
            broken, received = False, None
            try:
                if quorum["quorum"] != group_id:
                    group, group_id = None, None  # the old group's sockets close with it
                    group = new_group(store, quorum, me, env.rank, args.ft_timeout)
                    group_id = quorum["quorum"]
                    labels, step = quorum["labels"], quorum["step"]
                    say(f"quorum {group_id}: replicas {labels} from step {step}")
                if any(s < quorum["step"] for s in quorum["steps"]):
                    received = heal(group, replica, me, source, args.replica_id)
                error = None
            except RuntimeError as e:  # a member died or hung while the group formed or healed
                error = str(e).splitlines()[0]
            if not everywhere(error is None, ranks):
                group_id, broken, failed = None, True, failed + 1
                why = error or "on another rank"
                say(f"quorum {quorum['quorum']} failed ({why}); asking again")
                check_failures(failed)
                continue
            if behind:
                replica.load_bytes(received)
                say(f"healed from replica {quorum['labels'][source]} at step {replica.at.step}")
            at, m = replica.at, len(members)
            done = (args.max_steps and at.step >= args.max_steps) or at.epoch >= args.epochs
            if done or "stop" in quorum:  # every member decides it at the same step
                if me == 0:  # the job's checkpoint: one member writes it
                    save(m)
                stopped = None if done else {**quorum, "stopped": at.step, "why": quorum["stop"]}
                break
            if at.cursor + m * ranks * batch > n:  # the epoch's rest is smaller than a step
                at.epoch, at.cursor = at.epoch + 1, 0
                continue
            if perm_epoch != at.epoch:
                generator = torch.Generator().manual_seed(args.seed + at.epoch)
                perm, perm_epoch = torch.randperm(n, generator=generator), at.epoch
            start = at.cursor + (me * ranks + env.rank) * batch
            batch_indices = perm[start : start + batch]
            images, labels = default_collate([data.train[int(i)] for i in batch_indices])
            images = model_input(images, env.device, dtype)
            model.train()
            loss = loss_fn(model(images).to(dtype), labels.to(env.device))
            loss.backward()
            flat = pack(params, loss)
            if ranks > 1:  # the replica's sum first; a sibling's death ends the replica here
                dist.all_reduce(flat)
            slow_down("reduce")  # TRAIN_SLOW=reduce:S, tests only: a kill in mid-step
            try:
                group.allreduce([flat]).wait()
                error = None
            except RuntimeError as e:  # a peer died mid-step
                error = str(e).splitlines()[0]
            if not everywhere(error is None, ranks):  # discard, ask for a new quorum
                optimizer.zero_grad(set_to_none=True)
                group_id, broken, failed = None, True, failed + 1
                say(f"step {at.step + 1} discarded ({error or 'on another rank'}); redoing it")
                check_failures(failed)
                continue
            loss_value = unpack(flat, params, m * ranks)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            history.append([at.step + 1, at.epoch, at.cursor, m, group_id])
            at.step, at.cursor, failed = at.step + 1, at.cursor + m * ranks * batch, 0
            if at.step % args.log_every == 0:
                say(f"step {at.step} epoch {at.epoch} loss {loss_value:.4f} replicas {m}")
            if args.save_every and at.step % args.save_every == 0 and me == 0:
                save(m)  # the others wait in their next quorum request meanwhile
            fault(at.step)

    group = None
    if client:
        client.close()
    summary = {
        "replica": label,
        "ranks": ranks,
        "steps": replica.at.step,
        "epochs": replica.at.epoch,
        "final_loss": loss_value,
        "param_checksum": param_checksum(model),
        "history": history,  # [step, epoch, cursor, replicas, quorum id] of each step it took
        "dtype": args.dtype,
    }
    if stopped is not None:
        summary["stopped"] = {"after_step": stopped["stopped"], "why": stopped["why"]}
    outsider = stopped is not None and "members" not in stopped  # it took no step: no files
    if env.is_main and outsider:
        say(f"the job stopped after step {stopped['stopped']} ({stopped['why']}) without it")
    elif env.is_main:
        if not args.no_eval and stopped is None:  # a stop is quick: the deadline runs
            evaluation = eval_loader(data.eval, batch, rank=0, world_size=1, workers=0)
            summary["eval"] = evaluate(model, evaluation, env.device, dtype)
        out = Path(args.out_dir) / f"replica-{label}"
        out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        atomic_write(out / "model.pt", buf.getvalue())  # for the tests' oracle
        atomic_write(out / "summary.json", json.dumps(summary, indent=1).encode())
        if stopped is None:
            say(f"done: {replica.at.step} steps, loss {loss_value:.4f}")
        else:
            say(
                f"stopped by {stopped['why']} after step {stopped['stopped']}, checkpoint saved "
                f"in {args.out_dir} by replica {stopped['labels'][0]}; the same command with "
                "--resume auto goes on from there"
            )
    if ranks > 1:
        dist.barrier()  # rank 0 has written: a clean exit for all
        dist.destroy_process_group()
    return summary


def save_checkpoint(
    checkpoints: CheckpointManager, args: argparse.Namespace, replica: Replica, m: int, ranks: int
) -> Path:
    """The job's checkpoint, written by every rank of one member (a gather of their RNG
    states, then rank 0 writes): a ddp checkpoint of this replica's R ranks, whose position
    is also the cursor (step_in_epoch means nothing when an epoch's steps depend on who was
    alive)."""
    at = replica.at
    state = training_state(
        replica.model,
        replica.optimizer,
        replica.scheduler,
        None,
        epoch=at.epoch,
        step=at.step,
        step_in_epoch=0,
        world_size=ranks,
        args=args,
        devices=checkpoints.devices,
    )
    state["fault_tolerant"] = {"cursor": at.cursor, "replicas": m}
    return checkpoints.save(state)


def resume(
    checkpoints: CheckpointManager, args: argparse.Namespace, replica: Replica, env: DistEnv, n: int
) -> Path | None:
    """--resume: the checkpoint's state and position, on every rank of this replica (they
    agree before anything changes). Every replica of the job resumes the same file, so the
    first quorum finds them at the same step; one that found no file is healed by the others."""
    error, path, state = None, None, None
    try:
        path = checkpoints.find(args.resume)
        if path is not None:
            state = load_checkpoint(path)
            check_fault_tolerant(state, args, path, n)
    except CheckpointError as e:
        error = str(e)
    if env.world_size > 1:
        views: list[str | None] = [None] * env.world_size
        dist.all_gather_object(views, error)
        error = next((e for e in views if e is not None), None)
    if error is not None:
        raise CheckpointError(error)
    if path is None:
        return None
    restore_training_state(
        state, replica.model, replica.optimizer, replica.scheduler, None, path,
        env.rank, env.world_size, checkpoints.devices,
    )  # fmt: skip
    replica.at = Position(state["step"], state["epoch"], state["fault_tolerant"]["cursor"])
    return path


def check_fault_tolerant(state: dict, args: argparse.Namespace, path: Path, n: int) -> None:
    """Refuse a checkpoint that is not this job's: written without --fault-tolerance, with
    other flags, or with a position outside the training set."""
    position = state.get("fault_tolerant")
    if not isinstance(position, dict):
        raise CheckpointError(
            f"{path}: written without --fault-tolerance (its position is a step of a fixed "
            "world size, not the job's data cursor); resume it without --fault-tolerance"
        )
    check_counters(state, path)
    # The step's slices are --batch-size samples each, whatever the membership.
    check_same_flags(state["args"], vars(args), path, (*TRAJECTORY_FLAGS, "batch_size"))
    cursor = position.get("cursor")
    if type(cursor) is not int or not 0 <= cursor <= n:
        raise CheckpointError(
            f"{path}: fault_tolerant cursor is {cursor!r}, not a sample count from 0 to {n}"
        )


def agree_on_quorum(
    client: QuorumClient | None, step: int, broken: bool, ranks: int, stop: str = ""
) -> dict:
    """Rank 0 asks the coordinator; the replica's other ranks get the answer from it. The
    reply carries the replica's incarnation as "self"; a refusal ("error") reaches every
    rank. `stop`: the signal this replica's ranks agreed on, which stops the whole job."""
    quorum: dict | None = None
    if client:
        try:
            quorum = {**client.quorum(step, broken=broken, stop=stop), "self": client.inc}
        except QuorumLost as e:
            quorum = {"error": str(e)}
    if ranks > 1:
        box = [quorum]
        dist.broadcast_object_list(box, src=0)
        quorum = box[0]
    return quorum


def check_failures(failed: int) -> None:
    if failed > MAX_FAILED_IN_A_ROW:
        raise QuorumLost(f"{failed} steps in a row failed under new quorums; giving up")
