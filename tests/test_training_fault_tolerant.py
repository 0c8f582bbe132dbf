"""Per-step fault tolerance (train_ddp.py --fault-tolerance, training/fault_tolerant.py) against
its stated semantics: a step of m replicas is one process's step on the next m x B samples of
the epoch's permutation, so a job that loses a replica at step k equals one process taking
3 x B samples a step up to k and 2 x B after; a replica that rejoins is healed from a live peer
and ends bit-identical to the others.

Every process is a real one (the coordinator, `python train_ddp.py --fault-tolerance` per
replica), each under a deadline (tests/multiproc.py, Live). Slow: five processes load torch.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import pytest
import torch

from tests.multiproc import PYTHON, Live

DEADLINE_S = 240  # five torch imports on a loaded 2-core box, then a few seconds of steps
BATCH = 4
TRAIN_SIZE = 96  # 8 steps an epoch at 3 replicas, 12 at 2: the run crosses epochs
MAX_STEPS = 30
KILL_AT = 3
FLAGS = [
    "--model",
    "mlp",
    "--train-size",
    str(TRAIN_SIZE),
    "--batch-size",
    str(BATCH),
    "--max-steps",
    str(MAX_STEPS),
    "--epochs",
    "100",  # --max-steps ends the run
    "--dtype",
    "float64",
    "--no-eval",
    "--log-every",
    "1",
    "--ft-timeout",
    "20",
]
# Slowed steps (0.15 s each) keep the run going while the rejoiner joins.
ENV = {"GLOO_SOCKET_IFNAME": "lo", "TRAIN_FAULT": f"kill:2:{KILL_AT}", "TRAIN_SLOW": "step:0.15"}


def start_coordinator(*flags: str) -> tuple[Live, str]:
    coordinator = Live([PYTHON, "-m", "training.quorum", *flags])
    line = coordinator.wait_for(r"listening on", time.monotonic() + DEADLINE_S)
    assert line, coordinator.output()
    return coordinator, line.split("listening on ")[1].split(",")[0]


def replica(address: str, rid: int, out: Path, env: dict | None = None) -> Live:
    argv = [PYTHON, "train_ddp.py", "--fault-tolerance", "--coordinator", address]
    return Live(
        [*argv, "--replica-id", str(rid), "--out-dir", str(out), *FLAGS], env={**ENV, **(env or {})}
    )


def reference(schedule: list[int], flags: list[str] = FLAGS) -> tuple[dict, list[list[int]]]:
    """One process, no fault tolerance: step t takes the next schedule[t] x B samples of the
    epoch's permutation (the epoch ends when fewer are left) and steps on their mean loss.
    Returns the final parameters and each step's [step, epoch, cursor, replicas]."""
    from torch.utils.data import default_collate

    from data.datasets import build_datasets
    from train_ddp import parse_args
    from training.metrics import loss_fn
    from training.models import model_from_args, model_input
    from training.optim import make_optimizer, make_scheduler

    args = parse_args(flags)
    data = build_datasets(args.dataset, None, seed=args.seed, train_size=args.train_size)
    torch.manual_seed(args.seed)
    model = model_from_args(args, data).to(torch.float64)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, args.max_steps)
    n, epoch, cursor, steps = len(data.train), 0, 0, []
    for t, m in enumerate(schedule):
        if cursor + m * BATCH > n:
            epoch, cursor = epoch + 1, 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch))
        images, labels = default_collate(
            [data.train[int(i)] for i in perm[cursor : cursor + m * BATCH]]
        )
        loss_fn(model(model_input(images, torch.device("cpu"), torch.float64)), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        steps.append([t + 1, epoch, cursor, m])
        cursor += m * BATCH
    return model.state_dict(), steps


@pytest.mark.slow
@pytest.mark.oracle
def test_lost_replica_equals_survivors_and_rejoined_replica_is_bit_identical(tmp_path):
    deadline = time.monotonic() + DEADLINE_S
    coordinator, address = start_coordinator(
        "--min-replicas", "2", "--expect-replicas", "3", "--heartbeat-timeout", "1"
    )
    go = tmp_path / "go"
    procs = [replica(address, i, tmp_path) for i in range(3)]
    # Replica 2 again, after its death: loaded and built now, it joins when `go` appears.
    rejoiner = replica(address, 2, tmp_path, {"TRAIN_JOIN_AFTER": str(go), "TRAIN_FAULT": ""})
    try:
        assert procs[0].wait_for(r"quorum 2: ", deadline), procs[0].output()
        go.touch()
        assert procs[2].finish(deadline) == -9, procs[2].output()  # SIGKILLed at step 3
        for p in (procs[0], procs[1], rejoiner):
            assert p.finish(deadline) == 0, p.output()
    finally:
        for p in [*procs, rejoiner, coordinator]:
            p.kill()
    summaries = [json.loads((tmp_path / f"replica-{i}/summary.json").read_text()) for i in range(3)]
    survivor, rejoined = summaries[0], summaries[2]
    # The rejoined replica holds exactly its peers' state (bits: a checksum of every tensor).
    assert len({s["param_checksum"] for s in summaries}) == 1, summaries
    assert survivor["history"] == summaries[1]["history"]
    # The membership each step had: 3 up to the kill, 2 until the rejoin, then 3 again.
    schedule = [h[3] for h in survivor["history"]]
    joined = schedule.index(3, KILL_AT)
    assert schedule == [3] * KILL_AT + [2] * (joined - KILL_AT) + [3] * (MAX_STEPS - joined)
    assert joined > KILL_AT, "no step ran with the two survivors alone"
    assert rejoined["history"] == survivor["history"][-len(rejoined["history"]) :]
    assert len(rejoined["history"]) == MAX_STEPS - joined  # healed, then every step after
    # Semantics: step by step, the same samples as one process taking m x B of them...
    expected, steps = reference(schedule)
    assert [h[:4] for h in survivor["history"]] == steps
    # ...and the same parameters. Error model: float64; the replicas average m means where
    # the reference takes one mean of m x B, a difference of a few ulps (1e-16 relative) per
    # step, carried through 30 momentum-SGD steps of lr 0.015: far below 1e-10.
    got = torch.load(tmp_path / "replica-0/model.pt", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10)


def test_flags_that_the_replica_loop_does_not_run_are_refused_in_one_line():
    from core.errors import UsageError
    from train_ddp import parse_args
    from training.fault_tolerant import check_flags
    from training.quorum import QuorumClient, QuorumLost

    base = ["--fault-tolerance", "--coordinator", "127.0.0.1:29400"]
    check_flags(parse_args([*base, "--resume", "auto", "--save-every", "5"]))  # accepted
    refused = {
        "needs --coordinator HOST:PORT": ["--fault-tolerance"],
        "--grad-accum does not combine": [*base, "--grad-accum", "2"],
        "--sync does not combine": [*base, "--sync", "zero1"],
        "--async-save does not combine": [*base, "--async-save"],
        "cosine with --fault-tolerance needs --max-steps": [*base, "--lr-schedule", "cosine"],
        # The replica's loop all-reduces plainly over gloo: these would be ignored.
        "--comm-hook does not combine": [*base, "--comm-hook", "fp16"],
        "--find-unused-parameters does not combine": [*base, "--find-unused-parameters"],
        "--backend does not combine": [*base, "--backend", "nccl"],
        # validate()'s model/data pairing, which the replica skips: not a traceback at the
        # first forward.
        "--model gpt reads text": [*base, "--model", "gpt"],
    }
    for message, argv in refused.items():
        with pytest.raises(UsageError, match=re.escape(message)):
            check_flags(parse_args(argv))
    with pytest.raises(UsageError, match="expected HOST:PORT, got 'no-port'"):  # Parser.error
        parse_args([*base[:2], "no-port"])
    # Nothing listens on port 1: one line after the connect timeout, no traceback.
    with pytest.raises(QuorumLost, match="cannot reach the coordinator at 127.0.0.1:1"):
        QuorumClient("127.0.0.1:1", "0", quorum_timeout=0.2)


def test_a_ddp_checkpoint_and_a_fault_tolerant_one_are_each_refused_by_the_other_mode():
    """Their positions mean different things: a ddp step took a fixed number of samples, a
    fault-tolerant step as many as its membership had (the cursor says where the epoch is).
    Each mode refuses the other's file in one line, before anything is restored."""
    from train_ddp import parse_args
    from training.checkpoint import CheckpointError, check_resumable
    from training.fault_tolerant import check_fault_tolerant

    base = ["--fault-tolerance", "--coordinator", "127.0.0.1:29400", "--batch-size", "4"]
    args = parse_args(base)
    ft = {"epoch": 1, "step": 9, "step_in_epoch": 0, "world_size": 1, "scheduler": {}}
    ft |= {"args": dict(vars(args)), "fault_tolerant": {"cursor": 8, "replicas": 2}}
    check_fault_tolerant(ft, args, "ft.pt", n=96)  # this job's own: accepted
    ddp = {k: v for k, v in ft.items() if k != "fault_tolerant"}
    other = lambda *flags: parse_args([*base, *flags])
    refused = {
        "ddp.pt: written without --fault-tolerance": (ddp, args),
        "ft.pt: written with --batch-size 4 (this run: 8)": (ft, other("--batch-size", "8")),
        "ft.pt: written with --lr 0.015 (this run: 0.1)": (ft, other("--lr", "0.1")),
        "ft.pt: fault_tolerant cursor is 97, not a sample count from 0 to 96": (
            {**ft, "fault_tolerant": {"cursor": 97}}, args
        ),
    }  # fmt: skip
    for message, (state, live) in refused.items():
        with pytest.raises(CheckpointError, match=re.escape(message)):
            check_fault_tolerant(state, live, message.split(":")[0], n=96)
    with pytest.raises(CheckpointError, match="ft.pt: written by a --fault-tolerance job"):
        check_resumable(ft, parse_args(["--batch-size", "4"]), 2, "ft.pt")


@pytest.mark.oracle
def test_a_run_resumed_from_its_checkpoint_ends_with_the_straight_runs_bits(tmp_path):
    """One replica in this process, its coordinator on a thread: a run to step 4 (its
    index-0 member saves at the end, as at a stop), resumed with --resume auto to step 9,
    ends bit-identical to a straight run to step 9 in float32: the same membership sums
    the same numbers in the same order, so the checkpoint (model, momentum, scheduler,
    epoch, cursor) must carry everything. 6 steps an epoch: the resumed part crosses one."""
    import threading

    from train_ddp import parse_args
    from training.fault_tolerant import run_replica
    from training.quorum import Coordinator, serve

    store = serve("127.0.0.1", 0)
    store.set("ft/heartbeat_timeout", "5")
    coordinator = Coordinator(store, 1, heartbeat_timeout=5.0, join_timeout=5.0, log=print)
    done = threading.Event()

    def serve_quorums() -> None:
        while not done.is_set():
            coordinator.poll(time.monotonic())
            time.sleep(0.005)

    thread = threading.Thread(target=serve_quorums, daemon=True)
    thread.start()
    base = ["--fault-tolerance", "--coordinator", f"127.0.0.1:{store.port}", "--model", "mlp"]
    base += ["--train-size", "24", "--batch-size", "4", "--epochs", "100", "--no-eval"]
    run = lambda out, *flags: run_replica(parse_args([*base, "--out-dir", str(out), *flags]))
    try:
        straight = run(tmp_path / "straight", "--max-steps", "9")
        first = run(tmp_path / "stopped", "--max-steps", "4")
        resumed = run(tmp_path / "stopped", "--max-steps", "9", "--resume", "auto")
    finally:
        done.set()
        thread.join(timeout=10)
    assert (tmp_path / "stopped/checkpoint.pt").resolve().name == "step-00000009.pt"
    assert [h[:4] for h in first["history"] + resumed["history"]] == [
        h[:4] for h in straight["history"]
    ]
    assert resumed["history"][-1][1] == 1  # the resumed part crossed into epoch 1
    assert resumed["param_checksum"] == straight["param_checksum"]
    assert first["param_checksum"] != straight["param_checksum"]


def test_a_previous_run_or_an_unwritable_out_dir_is_refused_before_training(tmp_path):
    """The replica writes its results only at the end: what would fail or silently replace
    another run's results then is refused at the start, in one line."""
    from core.errors import UsageError
    from train_ddp import parse_args
    from training.fault_tolerant import check_out_dir

    base = ["--fault-tolerance", "--coordinator", "127.0.0.1:29400", "--out-dir", str(tmp_path)]
    check_out_dir(parse_args(base))  # an empty folder
    (tmp_path / "replica-0").mkdir()
    (tmp_path / "replica-0" / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match="holds a previous run of replica 0 .*--overwrite"):
        check_out_dir(parse_args(base))
    check_out_dir(parse_args([*base, "--overwrite"]))
    check_out_dir(parse_args([*base, "--replica-id", "1"]))  # another replica's folder
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is not a folder"):
        check_out_dir(parse_args([*base[:3], "--out-dir", str(tmp_path / "file")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "replica-0"]  # nothing made


def test_the_launchers_check_is_each_replicas_own(tmp_path):
    """check_replicas (launch/fault_tolerant.sh, before it starts anything) refuses what
    replica i would: its flags, and --out-dir/replica-<i>/ for each i of the job."""
    from core.errors import UsageError
    from train_ddp import parse_args
    from training.fault_tolerant import check_replicas

    flags = ["--out-dir", str(tmp_path)]
    (tmp_path / "replica-2").mkdir()
    (tmp_path / "replica-2" / "summary.json").write_text("{}")
    check_replicas(parse_args, 2, flags)  # replicas 0 and 1: replica-2/ is not theirs
    with pytest.raises(UsageError, match="holds a previous run of replica 2 "):
        check_replicas(parse_args, 3, flags)
    check_replicas(parse_args, 3, [*flags, "--resume", "auto"])
    with pytest.raises(UsageError, match="--sync does not combine with --fault-tolerance"):
        check_replicas(parse_args, 1, [*flags, "--sync", "zero1"])


# ------------------------------------------------ torture (make torture-fault-tolerance)

ROUNDS = int(os.environ.get("TORTURE_ROUNDS", "0"))
torture = pytest.mark.skipif(not ROUNDS, reason="TORTURE_ROUNDS=N: make torture-fault-tolerance")


def finished(tmp: Path, ids: list[int], procs: list[Live], deadline: float) -> list[dict]:
    for p in procs:
        assert p.finish(deadline) == 0, p.output()
    summaries = [json.loads((tmp / f"replica-{i}/summary.json").read_text()) for i in ids]
    assert len({s["param_checksum"] for s in summaries}) == 1, "replicas differ"
    return summaries


def on_the_oracle(summary: dict) -> None:
    """The run's steps and parameters equal one process's over the same memberships."""
    expected, steps = reference([h[3] for h in summary["history"]])
    assert [h[:4] for h in summary["history"]] == steps
    got = torch.load(Path(summary["out"]) / "model.pt", weights_only=True)
    for key, value in expected.items():  # error model: see the oracle test above
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10)


def rounds(scenario, tmp_path: Path) -> None:
    """Run `scenario(tmp, rng)` ROUNDS times; print the tally, fail if any round failed."""
    rng, failures, notes = random.Random(0), [], []
    for n in range(ROUNDS):
        tmp = tmp_path / f"round{n}"
        tmp.mkdir()
        try:
            notes.append(scenario(tmp, rng))
        except AssertionError as e:
            failures.append(f"round {n}: {str(e)[-3000:]}")
    print(f"\n{scenario.__name__}: {ROUNDS - len(failures)}/{ROUNDS} rounds passed; {notes}")
    assert not failures, "\n".join(failures)


def random_kill(tmp: Path, rng: random.Random) -> str:
    """A random replica SIGKILLed at a random moment (between or inside steps), replaced at
    once by a new one that heals and joins."""
    deadline = time.monotonic() + DEADLINE_S
    coordinator, address = start_coordinator(
        "--min-replicas", "2", "--expect-replicas", "3", "--heartbeat-timeout", "1"
    )
    victim, at, go = rng.randrange(3), rng.randrange(2, 20), tmp / "go"
    env = {"TRAIN_FAULT": "", "TRAIN_SLOW": "step:0.05"}
    # The victim sleeps 0.2 s before each all-reduce, its peers waiting inside theirs: most
    # kills land there, and the peers' step fails, is discarded and redone.
    slow = {**env, "TRAIN_SLOW": "step:0.05,reduce:0.2"}
    procs = [replica(address, i, tmp, slow if i == victim else env) for i in range(3)]
    spare = replica(address, victim, tmp, {**env, "TRAIN_JOIN_AFTER": str(go)})
    try:
        assert procs[victim].wait_for(rf"step {at} epoch", deadline), procs[victim].output()
        time.sleep(rng.uniform(0, 0.3))  # anywhere in the next step, mostly in the all-reduce
        procs[victim].kill()
        go.touch()
        survivors = [p for i, p in enumerate(procs) if i != victim]
        summaries = finished(tmp, [0, 1, 2], [*survivors, spare], deadline)
    finally:
        for p in [*procs, spare, coordinator]:
            p.kill()
    first = summaries[(victim + 1) % 3]
    first["out"] = str(tmp / f"replica-{(victim + 1) % 3}")
    on_the_oracle(first)
    redone = max(p.output().count("discarded") for p in survivors)
    return f"replica {victim} after step {at}: {redone} step(s) redone"


def killed_while_healing(tmp: Path, rng: random.Random) -> str:
    """The source dies after sending the state's size, before the state: the newcomer keeps
    its old state and heals from the other survivor."""
    deadline = time.monotonic() + DEADLINE_S
    coordinator, address = start_coordinator(
        "--min-replicas", "1", "--expect-replicas", "2", "--heartbeat-timeout", "1"
    )
    at, go = rng.randrange(2, 10), tmp / "go"
    env = {"TRAIN_FAULT": "", "TRAIN_SLOW": "step:0.05"}
    source = replica(address, 0, tmp, {**env, "TRAIN_HEAL_FAULT": "0"})
    try:  # replica 0 registers first: the lowest incarnation, the source of every heal
        assert source.wait_for(r"incarnation #1", deadline), source.output()
        other = replica(address, 1, tmp, env)
        newcomer = replica(address, 2, tmp, {**env, "TRAIN_JOIN_AFTER": str(go)})
        assert source.wait_for(rf"step {at} epoch", deadline), source.output()
        go.touch()
        assert source.finish(deadline) == -9, source.output()  # killed itself mid-heal
        summaries = finished(tmp, [1, 2], [other, newcomer], deadline)
    finally:
        for p in [source, other, newcomer, coordinator]:
            p.kill()
    assert "healed from replica 1" in newcomer.output(), newcomer.output()
    summaries[0]["out"] = str(tmp / "replica-1")
    on_the_oracle(summaries[0])
    return f"newcomer at step {summaries[1]['history'][0][0] - 1}"


def two_lost_at_once(tmp: Path, rng: random.Random) -> str:
    """Two of three replicas SIGKILLed together with --min-replicas 2: the survivor stops
    with one error line once --join-timeout passes without a replacement."""
    deadline = time.monotonic() + DEADLINE_S
    coordinator, address = start_coordinator(
        "--min-replicas", "2", "--expect-replicas", "3", "--heartbeat-timeout", "1",
        "--join-timeout", "3",
    )  # fmt: skip
    at = rng.randrange(2, 20)
    procs = [
        replica(address, i, tmp, {"TRAIN_FAULT": "", "TRAIN_SLOW": "step:0.05"}) for i in range(3)
    ]
    try:
        assert procs[0].wait_for(rf"step {at} epoch", deadline), procs[0].output()
        procs[1].kill()
        procs[2].kill()
        status = procs[0].finish(deadline)
    finally:
        for p in [*procs, coordinator]:
            p.kill()
    out = procs[0].output()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert status == 2 and "Traceback" not in out and "Exception raised from" not in out, out
    assert errors == [
        "error: no quorum: 1 replica(s) alive, --min-replicas 2 (none joined for 3 s)"
    ], out
    # The survivor saved the job's checkpoint first: --resume auto goes on from its step.
    saved = re.findall(r"replica 0: checkpoint .*step-(\d+)\.pt", out)
    assert saved and (tmp / "checkpoint.pt").resolve().name == f"step-{saved[-1]}.pt", out
    return f"after step {at}, saved at step {int(saved[-1])}"


@pytest.mark.slow
@torture
@pytest.mark.oracle
@pytest.mark.parametrize("scenario", [random_kill, killed_while_healing, two_lost_at_once])
def test_torture(scenario, tmp_path):
    rounds(scenario, tmp_path)
