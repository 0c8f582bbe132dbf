"""Preemption (training/preempt.py): a SIGTERM or SIGUSR1 to torchrun's agent or to one rank
stops every rank after the same optimizer step, with a checkpoint of that step, and
`--resume auto` then ends with the parameters of an uninterrupted run, bit for bit.

The jobs run float64 on 2 gloo ranks with one thread each, so the order of every sum is
fixed: a resumed run that lost or repeated a step, or restored anything inexactly, differs
from the straight run in its last bits. Every run has a deadline (tests/multiproc.py)."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import train_ddp
import train_dp
from core.errors import run_cli
from core.processes import descendants
from tests.multiproc import PYTHON, Live, run_cmd, run_world
from tests.test_launch_scripts import LOOPBACK, UNSET, free_port
from training.checkpoint import load_checkpoint
from training.preempt import Preemption

# 8 steps per epoch on 2 ranks x 4 samples, 2 epochs: 16 steps.
STEPS = 16
FLAGS = ["--model", "mlp", "--train-size", "64", "--eval-size", "16", "--batch-size", "4",
         "--epochs", "2", "--dtype", "float64", "--log-every", "1", "--resume", "auto"]  # fmt: skip
STOPPED = re.compile(r"preempted by (SIG\w+): stopped after step (\d+) of (\d+)")


def Job(out_dir: Path, env: dict[str, str] | None = None, *extra: str) -> Live:
    """`torchrun --standalone --nproc-per-node 2 train_ddp.py ...`, its output read live."""
    argv = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return Live([*argv, "train_ddp.py", *FLAGS, "--out-dir", str(out_dir), *extra], env)


def ranks(job: Live) -> list[int]:
    """The pids of the worker processes: the agent's children."""
    return [p for p in descendants(job.proc.pid) if _ppid(p) == job.proc.pid]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _resume_and_straight(rank: int, world_size: int, resumed: str, straight: str) -> list[dict]:
    """On 2 in-process ranks: finish the preempted run, then the same run uninterrupted."""
    return [
        train_ddp.main([*FLAGS, "--out-dir", resumed]),
        train_ddp.main([*FLAGS, "--out-dir", straight]),
    ]


def _assert_same_parameters(a: Path, b: Path, label: str = "") -> None:
    got, want = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert got["step"] == want["step"] == STEPS, label
    for key, tensor in want["model"].items():
        assert torch.equal(got["model"][key], tensor), f"{label}: {key} differs from straight"
    for index, entry in want["optimizer"]["state"].items():
        momentum = got["optimizer"]["state"][index]["momentum_buffer"]
        assert torch.equal(momentum, entry["momentum_buffer"]), f"{label}: momentum {index}"


def _assert_whole_checkpoints(out_dir: Path) -> list[int]:
    """Every checkpoint file in `out_dir` reads back whole (CRC-32 of every entry, the
    required keys); none is left half-written under a real name. Their steps."""
    steps = []
    for path in sorted((out_dir / "checkpoints").glob("*")):
        assert not path.name.startswith("."), f"a temporary file was left behind: {path}"
        steps.append(load_checkpoint(path)["step"])
    return steps


@pytest.mark.oracle
@pytest.mark.slow  # torchrun, its agent and two ranks, twice: 10 s
def test_sigterm_to_the_agent_stops_after_a_step_and_resume_is_exact(tmp_path):
    """SIGTERM to torchrun's agent mid-run: it forwards SIGTERM to both ranks, which finish
    the step they are in, agree on it, save it and exit 0 with one line; torchrun itself
    then exits 1 (it re-raises the signal as a SignalException, whatever its workers did).
    Resuming ends where an uninterrupted run ends, bit for bit."""
    deadline = time.monotonic() + 90
    job = Job(tmp_path / "stopped", {"TRAIN_SLOW": "step:0.1"})
    assert job.wait_for(r"^step 3 ", deadline), job.output()
    job.proc.send_signal(signal.SIGTERM)
    status = job.finish(deadline)
    out = job.output()
    assert status == 1 and "SignalException" in out, out  # torchrun's own exit (see docs)
    assert "Unable to shutdown process" not in out, out  # no rank needed the SIGKILL
    (stop,) = STOPPED.findall(out)
    name, step, total = stop[0], int(stop[1]), int(stop[2])
    assert name == "SIGTERM" and total == STEPS and 3 <= step < STEPS, out
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["step"] == step
    assert not (tmp_path / "stopped" / "summary.json").exists()  # the run is not over

    resumed, straight = run_world(
        _resume_and_straight, 2, str(tmp_path / "stopped"), str(tmp_path / "straight"),
        timeout=90,
    )[0]  # fmt: skip
    assert resumed["steps"] == straight["steps"] == STEPS
    assert resumed["param_checksum"] == straight["param_checksum"]
    _assert_same_parameters(tmp_path / "stopped", tmp_path / "straight")


def test_one_process_stops_on_sigusr1_and_restores_the_handlers(tmp_path, capsys):
    """train_dp.py, a world of one: the handler only sets a flag, the step ends, a checkpoint
    is saved, main() returns normally, and the caller's handlers are back afterwards."""
    args = [*FLAGS, "--batch-size", "8", "--out-dir", str(tmp_path)]
    sent = []

    def send_after_step_5(step: int) -> None:
        if step == 5 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives in the middle of step 5's hook

    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    original = train_dp.fault_hook
    train_dp.fault_hook = lambda rank: send_after_step_5
    try:
        assert run_cli(train_dp.main, args) == 0
    finally:
        train_dp.fault_hook = original
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
    out = capsys.readouterr().out
    assert "preempted by SIGUSR1: stopped after step 5 of 16" in out, out
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5
    assert _assert_whole_checkpoints(tmp_path) == [5]


@pytest.mark.slow  # the SIGTERM-to-the-agent test covers the agreement by default
def test_a_rank_that_got_no_signal_stops_with_the_one_that_did(tmp_path):
    """Preemption.requested() is the ranks' agreement: only rank 1 is signalled, both see it
    after the same step (the all-reduce of the signal number). Also through the gloo group
    that an NCCL job makes for it (the job's backend is named nccl here; the group is gloo),
    which has the job's timeout: a peer that stops calling requested() fails it after the
    job's PG_TIMEOUT seconds, not after gloo's default 30 minutes."""
    results = run_world(_agree, 2, str(tmp_path / "store"), timeout=90, pg_timeout=PG_TIMEOUT)
    assert [runs for runs, _ in results] == [[[False, False, True, True]] * 2] * 2
    waited = results[0][1]
    assert PG_TIMEOUT - 0.5 < waited < PG_TIMEOUT + 10, waited  # 10: a loaded machine


PG_TIMEOUT = 6.0


def _agree(rank: int, world_size: int, store_path: str) -> tuple[list[list[bool]], float]:
    from core.dist import resolve

    runs, waited = [], 0.0
    for env in (resolve(), dataclasses.replace(resolve(), backend="nccl")):
        seen = []
        with Preemption("USR1", env) as preempt:
            assert (preempt.group is None) == (env.backend == "gloo")
            for step in range(4):
                if step == 2 and rank == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                seen.append(preempt.requested())
        assert preempt.agreed == signal.SIGUSR1
        runs.append(seen)
    # Rank 1 stays alive (a closed socket would fail rank 0 at once) but calls nothing.
    store = torch.distributed.FileStore(store_path, world_size)
    with Preemption("none", dataclasses.replace(resolve(), backend="nccl")) as preempt:
        if rank == 0:
            start = time.monotonic()
            with pytest.raises(RuntimeError):
                preempt.requested()
            waited = time.monotonic() - start
            store.set("rank 0 timed out", "1")
        else:
            store.wait(["rank 0 timed out"], timedelta(seconds=60))
    return runs, waited


# ------------------------------------------------------------------ Ctrl-C


def _ctrl_c(argv: list[str], out_dir: Path) -> tuple[int, list[str]]:
    """Start `argv` in a session of its own and, once it has logged step 3, press Ctrl-C as a
    terminal does: SIGINT to the whole foreground process group. Checks that the ranks
    stopped after one step, all of them, with a checkpoint of that step; returns the exit
    status and the output lines."""
    deadline = time.monotonic() + 120
    job = Live(argv, {"TRAIN_SLOW": "step:0.1"})
    assert job.wait_for(r"^step 3 ", deadline), job.output()
    os.killpg(job.proc.pid, signal.SIGINT)
    status = job.finish(deadline)
    out = job.output()
    (stop,) = STOPPED.findall(out)
    assert stop[0] == "SIGINT" and 3 <= int(stop[1]) < int(stop[2]), out
    assert load_checkpoint(out_dir / "checkpoint.pt")["step"] == int(stop[1]), out
    assert "KeyboardInterrupt" not in out and "Unable to shutdown process" not in out, out
    assert not re.search(r'File ".*(train_d+p|training|core|parallel)\b', out), out  # ours
    return status, out.splitlines()


@pytest.mark.slow
def test_ctrl_c_under_plain_torchrun_saves_with_no_traceback_of_ours(tmp_path):
    """torchrun gets the terminal's SIGINT too and passes it on to the ranks at once: that
    second SIGINT is the same Ctrl-C (SAME_INTERRUPT_S), and the ranks save once and exit 0.
    torchrun itself then exits 1 with its own SignalException report (not ours to change)."""
    status, _ = _ctrl_c(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "train_ddp.py", *FLAGS, "--out-dir", str(tmp_path)], tmp_path,
    )  # fmt: skip
    assert status == 1


@pytest.mark.slow
def test_ctrl_c_under_cpu_sim_is_the_ranks_one_line(tmp_path):
    """launch/cpu_sim.sh keeps torchrun out of the terminal's process group and passes the
    Ctrl-C on to the ranks only: they save and exit 0, torchrun ends as after any run, and
    the preemption line is the last thing on the screen: no traceback at all."""
    status, lines = _ctrl_c(
        ["launch/cpu_sim.sh", "2", *FLAGS, "--out-dir", str(tmp_path)], tmp_path
    )
    text = "\n".join(lines)
    assert status == 0 and "Traceback" not in text and "SignalException" not in text, text
    assert STOPPED.search(lines[-1]), text


@pytest.mark.slow
def test_ctrl_c_stops_train_dp_with_a_checkpoint(tmp_path):
    """One process: Ctrl-C finishes the step, saves it and exits 0 with the one line."""
    argv = [PYTHON, "train_dp.py", *FLAGS, "--batch-size", "8", "--out-dir", str(tmp_path)]
    status, lines = _ctrl_c(argv, tmp_path)
    assert status == 0 and "Traceback" not in "\n".join(lines) and STOPPED.search(lines[-1])


SECOND_CTRL_C = """
import os, signal, time
import training.preempt as preempt
from core.dist import resolve

preempt.SAME_INTERRUPT_S = 0.5
with preempt.Preemption("none", resolve()) as p:
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    os.kill(os.getpid(), signal.SIGINT)  # torchrun passing it on: the same request
    time.sleep(0.1)
    print(p.requested(), p.agreed.name, flush=True)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again
    time.sleep(30)
print("not reached")
"""


def test_a_second_ctrl_c_ends_the_process_at_once_with_one_line():
    """The handler only sets a flag (the step goes on, then the ranks agree and save); a
    SIGINT right after the first is the same Ctrl-C; a later one ends the process at once,
    status 130, one line on stderr and no traceback."""
    done = run_cmd([PYTHON, "-c", SECOND_CTRL_C], timeout=60)
    assert done.returncode == 130, done
    assert done.stdout == "True SIGINT\n", done
    assert done.stderr == "rank 0: interrupted twice, ending without a checkpoint\n", done


# ------------------------------------------------------------------ the random trials


def _trial(seed: int, tmp_path: Path) -> tuple[str, list[str], str]:
    """One preemption at a random moment: to the agent or to one rank, SIGTERM or SIGUSR1,
    a third of them while a checkpoint is half-written, half with a DataLoader worker per
    rank. Returns the out-dir, the job's extra flags, and what happened."""
    rng = random.Random(seed)
    out_dir = tmp_path / f"trial{seed}"
    during_save = seed % 3 == 0
    env = {"TRAIN_SLOW": "step:0.1,save:1.0" if during_save else "step:0.1"}
    extra = ["--save-every", "4"] if during_save else []
    if seed % 2:  # a DataLoader worker per rank: in the rank's process group, signalled too
        extra += ["--workers", "1"]
    deadline = time.monotonic() + 120
    job = Job(out_dir, env, *extra)
    target = rng.choice(["agent", "rank"])
    sig = signal.SIGTERM if target == "agent" or seed % 4 >= 2 else signal.SIGUSR1
    at = rng.randrange(1, STEPS - 3)
    if during_save:  # steps 4 and 8 are saved, and each write sleeps halfway through
        at = rng.choice([4, 8])
    assert job.wait_for(rf"^step {at - 1 if during_save else at} ", deadline), job.output()
    if during_save:
        time.sleep(0.4)  # step `at` is done, its checkpoint half-written (a 1 s pause)
    if target == "agent":
        job.proc.send_signal(sig)
    else:
        os.kill(rng.choice(ranks(job)), sig)
    status = job.finish(deadline)
    out = job.output()
    assert "Unable to shutdown process" not in out, out  # nobody needed torchrun's SIGKILL
    assert status == (1 if target == "agent" else 0), out
    (stop,) = STOPPED.findall(out)
    step = int(stop[1])
    # No step lost: the stop step is the one the signal came in, or a later one.
    assert stop[0] == sig.name and (step == at if during_save else step >= at), out
    steps = _assert_whole_checkpoints(out_dir)
    assert load_checkpoint(out_dir / "checkpoint.pt")["step"] == step and step in steps
    what = f"{target} {sig.name} after step {at}{' mid-save' if during_save else ''}"
    return str(out_dir), extra, f"{what}: stopped after {step}"


def _straight_and_resume_all(rank: int, world_size: int, straight: str, trials: list) -> int:
    """On 2 in-process ranks: the uninterrupted run, then every trial resumed to the end
    with its own flags and --resume auto (FLAGS)."""
    train_ddp.main([*FLAGS, "--out-dir", straight])
    for out_dir, extra, _ in trials:
        assert train_ddp.main([*FLAGS, "--out-dir", out_dir, *extra])["steps"] == STEPS
    return len(trials)


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.long  # 2 minutes; test_float32_preemption_at_3_ranks preempts in CI
def test_ten_random_preemptions_lose_nothing(tmp_path):
    trials = [_trial(seed, tmp_path) for seed in range(10)]
    straight = tmp_path / "straight"
    run_world(_straight_and_resume_all, 2, str(straight), trials, timeout=180)
    for out_dir, _, what in trials:
        assert _assert_whole_checkpoints(Path(out_dir)), what
        _assert_same_parameters(Path(out_dir), straight, what)
    print("\n".join(what for _, _, what in trials))


# ------------------------------------------- SIGUSR1 the documented way (docs/launching.md)

LAUNCHERS = {
    # launch/*.sh: signal the script, or its process group (which holds the agent, not the
    # ranks: torchrun starts each rank in a session of its own); it passes USR1 to the ranks.
    "multi_node.sh, its process group": (
        ["bash", "launch/multi_node.sh"],
        lambda job: os.killpg(job.proc.pid, signal.SIGUSR1),
    ),
    "cpu_sim.sh, the script": (
        ["bash", "launch/cpu_sim.sh", "2"],
        lambda job: os.kill(job.proc.pid, signal.SIGUSR1),
    ),
    # Plain torchrun: the ranks, the agent's children (USR1 to torchrun itself would end it).
    "torchrun, pkill -USR1 -P <torchrun>": (
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "train_ddp.py",
        ],  # fmt: skip
        lambda job: subprocess.run(["pkill", "-USR1", "-P", str(job.proc.pid)], check=True),
    ),
}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over the loopback interface 'lo'")
@pytest.mark.parametrize("way", LAUNCHERS)
def test_sigusr1_sent_the_documented_way_stops_every_rank(tmp_path, way):
    """Every rank stops after the same step (the job exits 0, which it cannot while one rank
    trains on) with the preemption line and a checkpoint of that step."""
    argv, send = LAUNCHERS[way]
    env = {
        **UNSET, "PYTHON": PYTHON, "TRAIN_SLOW": "step:0.1", "NNODES": "1", "NPROC": "2",
        "BACKEND": "gloo", "GLOO_SOCKET_IFNAME": LOOPBACK, "LOCAL_ADDR": "127.0.0.1",
        "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
    }  # fmt: skip
    deadline = time.monotonic() + 120
    job = Live([*argv, *FLAGS, "--out-dir", str(tmp_path)], env)
    assert job.wait_for(r"^step 3 ", deadline), job.output()
    send(job)
    status = job.finish(deadline)
    out = job.output()
    assert status == 0, out
    (stop,) = STOPPED.findall(out)
    assert stop[0] == "SIGUSR1" and 3 <= int(stop[1]) < STEPS, out
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == int(stop[1])
    assert not (tmp_path / "summary.json").exists()


# float32 at 3 ranks, where DDP's bucket layout decides the bits (parallel/ddp.py): the cnn
# (its gradient-ready order is not its definition order), AdamW, --grad-accum 3; 5 steps.
FLOAT32 = ["--model", "cnn", "--train-size", "96", "--eval-size", "8", "--batch-size", "2",
           "--grad-accum", "3", "--optimizer", "adamw", "--epochs", "1", "--dtype", "float32",
           "--log-every", "1", "--no-eval", "--resume", "auto"]  # fmt: skip


@pytest.mark.slow  # three torchrun jobs of 3 ranks
@pytest.mark.oracle
def test_float32_preemption_at_3_ranks_resumes_bit_identical(tmp_path):
    deadline = time.monotonic() + 300
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]

    def job(name: str, env: dict[str, str] | None = None) -> Live:
        return Live([*torchrun, "train_ddp.py", *FLOAT32, "--out-dir", str(tmp_path / name)], env)

    stopped = job("stopped", {"TRAIN_SLOW": "step:0.5"})
    assert stopped.wait_for(r"^step 1 ", deadline), stopped.output()
    stopped.proc.send_signal(signal.SIGTERM)
    stopped.finish(deadline)
    (stop,) = STOPPED.findall(stopped.output())
    assert 1 <= int(stop[1]) < int(stop[2]) == 5, stopped.output()
    for name in ("stopped", "straight"):  # resume it; the same run uninterrupted
        run = job(name)
        assert run.finish(deadline) == 0, run.output()
    got = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    want = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert got["step"] == want["step"] == 5
    for key, tensor in want["model"].items():
        assert torch.equal(got["model"][key], tensor), key
    for index, entry in want["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(got["optimizer"]["state"][index][name], value), (index, name)
