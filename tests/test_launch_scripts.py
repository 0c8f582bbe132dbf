"""Every recipe in launch/ is executed here, on CPU processes with gloo.

The oracle is the single-node run: `launch/cpu_sim.sh 2` trains 2 ranks for a few steps, and
every other recipe started with the same world size and flags (two torchrun agents as two
"nodes", the GPU recipe with the backend switched to gloo, the SLURM batch script under a
fake srun, torch.multiprocessing.spawn) must end with bit-identical parameters. Every run
pins one thread per rank (run_cmd sets OMP_NUM_THREADS=1): the thread count changes how CPU
kernels split their sums, and with it the last bits of the result.

Cheap tests run the scripts with a fake `python`, `srun` and `scontrol` on PATH that record
what they were asked to do; they check the command lines and the environment every script
builds without starting torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.multiproc import ROOT, Live, run_cmd
from training.checkpoint import load_checkpoint

LAUNCH = ROOT / "launch"
SCRIPTS = ["cpu_sim.sh", "multi_gpu.sh", "multi_node.sh", "slurm.sbatch", "fault_tolerant.sh"]
# A few steps of the default model on a small synthetic set: 4 steps of 2 x 32 samples.
SHORT = [
    *("--train-size", "512", "--eval-size", "100"),
    *("--max-steps", "4", "--epochs", "1", "--no-eval"),
]
LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"
# The scripts' settings, emptied (= unset for them) so that a developer's exports cannot leak in.
UNSET = dict.fromkeys(
    ("NPROC", "BACKEND", "LOG_DIR", "NNODES", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_CONF")
    + ("RDZV_PORT", "IFNAME", "LOCAL_ADDR", "MAX_RESTARTS", "SLURM_CPUS_PER_TASK")
    + ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"),
    "",
)


def free_port() -> int:
    """A port nobody listens on right now (for rendezvous endpoints the test must name)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """Run a launch/ script with this interpreter as its PYTHON."""
    return run_cmd(
        ["bash", str(LAUNCH / script), *args],
        timeout=timeout,
        env={**UNSET, "PYTHON": sys.executable, **(env or {})},
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n--- stdout ---\n{result.stdout}"
        f"\n--- stderr ---\n{result.stderr}"
    )


def assert_same_parameters(out_dir: Path, reference: Path) -> None:
    got = load_checkpoint(out_dir / "checkpoint.pt")
    want = load_checkpoint(reference / "checkpoint.pt")
    assert got["world_size"] == want["world_size"] == 2
    assert got["step"] == want["step"] == 4
    assert got["model"].keys() == want["model"].keys()
    for key, tensor in want["model"].items():
        assert torch.equal(got["model"][key], tensor), f"{key} differs from the single-node run"
    summary = json.loads((out_dir / "summary.json").read_text())
    reference_summary = json.loads((reference / "summary.json").read_text())
    assert summary["param_checksum"] == reference_summary["param_checksum"]


def run_single_node(out: Path) -> Path:
    """The reference: launch/cpu_sim.sh with 2 ranks (its first argument is the rank count)."""
    result = launch("cpu_sim.sh", "2", *SHORT, "--out-dir", str(out))
    assert_ok(result)
    assert "2 rank(s), gloo on cpu" in result.stdout
    return out


@pytest.fixture(scope="module")
def single_node(tmp_path_factory) -> Iterator[Future[Path]]:
    """The reference run, started in the background once for the whole module: a test starts
    its own launch alongside it and calls `.result()` when it needs the reference."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run_single_node, tmp_path_factory.mktemp("cpu_sim"))


# ---------------------------------------------------------------- static checks


def test_every_launch_script_is_tested_and_parses():
    # A new recipe in launch/ must get a test here (spawn.py and fault_tolerant.sh are run by
    # their own tests; the scripts source run_agent.sh, and tests/test_training_preempt.py
    # signals it).
    found = sorted(p.name for p in LAUNCH.iterdir() if p.name != "__pycache__")
    assert found == sorted([*SCRIPTS, "spawn.py", "run_agent.sh"])
    for name in SCRIPTS:
        assert os.access(LAUNCH / name, os.X_OK), f"launch/{name} is not executable"
    for name in [*SCRIPTS, "run_agent.sh"]:
        check = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    check = subprocess.run(
        ["shellcheck", "-x", *(str(LAUNCH / name) for name in SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=ROOT,  # -x: follow `source` lines, whose paths are relative to the checkout
    )
    assert check.returncode == 0, check.stdout + check.stderr


# ------------------------------------------- command lines, with fake programs on PATH

FAKES = {
    # `python -c ...` is the GPU count query; anything else is a torchrun command line.
    "python": """
        if [[ $1 == -c ]]; then echo "${FAKE_GPUS:-0}"; exit 0; fi
        printf '%s\\n' "$@" > "$FAKE_LOG/torchrun.args"
        env > "$FAKE_LOG/torchrun.env"
    """,
    # One task per node, and this fake allocation has one node: run the command once. Like
    # SLURM's step daemon (proctrack/cgroup), pass a SIGUSR1 on to every process of the step.
    "srun": """
        printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
        while [[ $1 == -* ]]; do shift; done
        "$@" &
        task=$!
        tree() { local p; for p in $(pgrep -P "$1"); do echo "$p"; tree "$p"; done; }
        trap 'kill -USR1 $task $(tree $task) 2>/dev/null || true' USR1
        while :; do wait $task && s=0 || s=$?; kill -0 $task 2>/dev/null || exit $s; done
    """,
    "scontrol": """
        printf '%s\\n' "$@" > "$FAKE_LOG/scontrol.args"
        printf '%s\\n' $FAKE_NODES
    """,
}


@pytest.fixture
def fakes(tmp_path) -> dict[str, str]:
    """Environment that puts the fake programs first on PATH and logs to tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        lines = [line.strip() for line in body.strip().splitlines()]
        path.write_text("#!/usr/bin/env bash\nset -eu\n" + "\n".join(lines) + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {
        **UNSET,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "FAKE_LOG": str(tmp_path),
        "OMP_NUM_THREADS": "",  # let the scripts choose
    }


def recorded(fakes: dict[str, str], name: str) -> list[str]:
    return (Path(fakes["FAKE_LOG"]) / f"{name}.args").read_text().splitlines()


def recorded_env(fakes: dict[str, str]) -> dict[str, str]:
    text = (Path(fakes["FAKE_LOG"]) / "torchrun.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def run_fake(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_cmd(["bash", str(script), *args], timeout=30, env=env)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def threads_for(ranks: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return str(max(1, cores // ranks))


def test_cpu_sim_command_line(fakes):
    result = run_fake(LAUNCH / "cpu_sim.sh", "3", "--epochs", "1", env=fakes)
    assert_ok(result)
    argv = recorded(fakes, "torchrun")
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert flag(argv, "--nnodes") == "1" and flag(argv, "--nproc-per-node") == "3"
    # loopback only (tests/test_core_loopback.py): a file rendezvous, workers' store on 127.0.0.1
    assert "--standalone" not in argv and flag(argv, "--rdzv-conf") == "store_type=file"
    assert flag(argv, "--local-addr") == "127.0.0.1"
    assert argv[-5:] == [str(ROOT / "train_ddp.py"), "--backend", "gloo", "--epochs", "1"]
    env = recorded_env(fakes)
    assert env["OMP_NUM_THREADS"] == threads_for(3)
    assert env["GLOO_SOCKET_IFNAME"] == LOOPBACK
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"

    assert_ok(run_fake(LAUNCH / "cpu_sim.sh", env={**fakes, "NPROC": "4"}))
    assert flag(recorded(fakes, "torchrun"), "--nproc-per-node") == "4"
    bad = run_fake(LAUNCH / "cpu_sim.sh", env={**fakes, "NPROC": "two"})
    assert bad.returncode == 2 and bad.stderr.startswith("error: the number of ranks")


def test_multi_gpu_command_line(fakes):
    result = run_fake(LAUNCH / "multi_gpu.sh", "--epochs", "1", env={**fakes, "FAKE_GPUS": "4"})
    assert_ok(result)
    argv = recorded(fakes, "torchrun")
    assert "--standalone" in argv and flag(argv, "--nproc-per-node") == "4"
    assert flag(argv, "--local-ranks-filter") == "0" and "--tee" not in argv
    assert argv[-4:] == ["--backend", "nccl", "--epochs", "1"]
    assert recorded_env(fakes)["OMP_NUM_THREADS"] == threads_for(4)

    env = {**fakes, "NPROC": "2", "BACKEND": "gloo", "LOG_DIR": "/tmp/logs", "OMP_NUM_THREADS": "3"}
    assert_ok(run_fake(LAUNCH / "multi_gpu.sh", env=env))
    argv = recorded(fakes, "torchrun")
    assert flag(argv, "--nproc-per-node") == "2" and argv[-2:] == ["--backend", "gloo"]
    assert flag(argv, "--log-dir") == "/tmp/logs" and flag(argv, "--tee") == "3"
    assert recorded_env(fakes)["OMP_NUM_THREADS"] == "3"  # the user's choice is kept

    no_gpu = run_fake(LAUNCH / "multi_gpu.sh", env={**fakes, "FAKE_GPUS": "0"})
    assert no_gpu.returncode == 2
    assert no_gpu.stderr.startswith(
        "error: no CUDA GPU is visible; on CPU run NPROC=2 BACKEND=gloo"
    )


def test_multi_node_command_line(fakes):
    env = {**fakes, "NNODES": "2:4", "RDZV_ENDPOINT": "node0:29400", "FAKE_GPUS": "8"}
    assert_ok(run_fake(LAUNCH / "multi_node.sh", "--epochs", "1", env=env))
    argv = recorded(fakes, "torchrun")
    assert flag(argv, "--nnodes") == "2:4" and flag(argv, "--nproc-per-node") == "8"
    assert flag(argv, "--rdzv-backend") == "c10d"
    assert flag(argv, "--rdzv-endpoint") == "node0:29400" and flag(argv, "--rdzv-id") == "ddp"
    assert flag(argv, "--max-restarts") == "0" and "--standalone" not in argv
    assert "--local-addr" not in argv and "--rdzv-conf" not in argv
    assert argv[-4:] == ["--backend", "nccl", "--epochs", "1"]
    assert recorded_env(fakes)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts need it

    env.update(NNODES="2", NPROC="1", RDZV_ID="exp7", MAX_RESTARTS="3")
    assert_ok(run_fake(LAUNCH / "multi_node.sh", env=env))
    argv = recorded(fakes, "torchrun")
    assert flag(argv, "--rdzv-id") == "exp7" and flag(argv, "--max-restarts") == "3"
    assert recorded_env(fakes)["OMP_NUM_THREADS"] == threads_for(1)

    # The endpoint is this node's own (non-loopback) address: it must host the store.
    env.update(IFNAME="", LOCAL_ADDR="10.1.2.3", RDZV_ENDPOINT="10.1.2.3:29400")
    assert_ok(run_fake(LAUNCH / "multi_node.sh", env=env))
    argv = recorded(fakes, "torchrun")
    assert flag(argv, "--local-addr") == "10.1.2.3" and flag(argv, "--rdzv-conf") == "is_host=1"

    for broken, message in [
        ({"NNODES": ""}, "error: set NNODES"),
        ({"NNODES": "two"}, "error: set NNODES"),
        ({"RDZV_ENDPOINT": "node0"}, "error: set RDZV_ENDPOINT"),
        ({"IFNAME": "no-such-if0"}, "error: IFNAME=no-such-if0: found no IPv4 address"),
    ]:
        bad = run_fake(LAUNCH / "multi_node.sh", env={**env, "LOCAL_ADDR": "", **broken})
        assert bad.returncode == 2 and bad.stderr.startswith(message), bad.stderr


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (`ip`)")
def test_multi_node_interface_selection(fakes):
    """IFNAME picks the interface for gloo and NCCL, and the address the node advertises."""
    env = {**fakes, "NNODES": "2", "NPROC": "1", "RDZV_ENDPOINT": "node0:29400", "IFNAME": "lo"}
    assert_ok(run_fake(LAUNCH / "multi_node.sh", env=env))
    seen = recorded_env(fakes)
    assert seen["GLOO_SOCKET_IFNAME"] == seen["NCCL_SOCKET_IFNAME"] == "lo"
    assert flag(recorded(fakes, "torchrun"), "--local-addr") == "127.0.0.1"


def slurm_env(fakes: dict[str, str], nodes: list[str], job_id: str) -> dict[str, str]:
    return {
        **fakes,
        "FAKE_NODES": " ".join(nodes),
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": "fake-list[0]",
        "SLURM_JOB_NUM_NODES": str(len(nodes)),
        "SLURM_SUBMIT_DIR": str(ROOT),
    }


def test_slurm_command_line(fakes, tmp_path):
    # sbatch runs a copy of the script from its spool directory: so does this test.
    spool = tmp_path / "spool"
    spool.mkdir()
    script = spool / "slurm_script"
    shutil.copy(LAUNCH / "slurm.sbatch", script)
    env = {
        **slurm_env(fakes, ["gpu-a17", "gpu-a18"], "4242"),
        "SLURM_CPUS_PER_TASK": "32",
        "FAKE_GPUS": "4",
    }
    result = run_cmd([str(script), "--epochs", "1"], timeout=30, env=env, cwd=tmp_path)
    assert_ok(result)
    assert recorded(fakes, "scontrol") == ["show", "hostnames", "fake-list[0]"]
    assert recorded(fakes, "srun") == [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=32",
        str(LAUNCH / "multi_node.sh"),
        "--resume",  # a requeued job goes on from its checkpoint
        "auto",
        "--epochs",
        "1",
    ]
    argv = recorded(fakes, "torchrun")
    assert flag(argv, "--nnodes") == "2" and flag(argv, "--nproc-per-node") == "4"
    assert flag(argv, "--rdzv-endpoint") == "gpu-a17:24242"  # head node, 20000 + id % 10000
    assert flag(argv, "--rdzv-id") == "4242"
    assert argv[-6:] == ["--backend", "nccl", "--resume", "auto", "--epochs", "1"]

    env.update(RDZV_PORT="31000")
    assert_ok(run_cmd([str(script)], timeout=30, env=env, cwd=tmp_path))
    assert flag(recorded(fakes, "torchrun"), "--rdzv-endpoint") == "gpu-a17:31000"

    outside = run_cmd([str(script)], timeout=30, env={**env, "SLURM_JOB_ID": ""}, cwd=tmp_path)
    assert outside.returncode == 2 and outside.stderr.startswith("error: submit this with sbatch")
    elsewhere = run_cmd(
        [str(script)], timeout=30, env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)}, cwd=tmp_path
    )
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.startswith("error: submit from the repository root")


# ------------------------------------------------------------------ real runs


@pytest.mark.slow  # two torchrun agents: 11 s of the default suite's 2 minutes
def test_two_agents_on_loopback_equal_single_node(single_node, tmp_path):
    """launch/multi_node.sh twice on this machine: two torchrun agents, one rank each, meet at
    a c10d rendezvous on loopback and train as one job of world size 2."""
    out = tmp_path / "out"
    env = {
        "NNODES": "2",
        "NPROC": "1",
        "BACKEND": "gloo",
        "GLOO_SOCKET_IFNAME": LOOPBACK,
        "LOCAL_ADDR": "127.0.0.1",
        "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "RDZV_ID": "two-agents",
    }
    with ThreadPoolExecutor(2) as pool:
        agents = [
            pool.submit(launch, "multi_node.sh", *SHORT, "--out-dir", str(out), env=env)
            for _ in range(2)
        ]
        results = [agent.result() for agent in agents]
    for result in results:
        assert_ok(result)
    # Only global rank 0 logs, so exactly one of the two agents printed the run.
    assert sum("2 rank(s), gloo on cpu" in r.stdout for r in results) == 1
    assert_same_parameters(out, single_node.result())


@pytest.mark.slow
def test_multi_gpu_recipe_on_cpu_equals_single_node(single_node, tmp_path):
    out = tmp_path / "out"
    result = launch(
        "multi_gpu.sh", *SHORT, "--out-dir", str(out), env={"NPROC": "2", "BACKEND": "gloo"}
    )
    assert_ok(result)
    assert_same_parameters(out, single_node.result())


@pytest.mark.slow
def test_multi_gpu_failure_report_and_rank_filter(tmp_path):
    """A crash on rank 0 is named in torchrun's report with its traceback (@record), and
    --local-ranks-filter 0 keeps rank 1's output off the console but in LOG_DIR."""
    env = {
        "NPROC": "2",
        "BACKEND": "gloo",
        "LOG_DIR": str(tmp_path / "logs"),
        "PYTHONPROFILEIMPORTTIME": "1",  # every Python process writes "import time:" lines
        "TRAIN_FAULT": "raise:0:1",  # rank 0 raises a RuntimeError after step 1: a crash
    }
    result = launch("multi_gpu.sh", *SHORT, "--out-dir", str(tmp_path / "run"), env=env)
    assert result.returncode != 0
    report = result.stderr[result.stderr.index("Root Cause") :]
    assert "rank      : 0 (local_rank: 0)" in report
    assert "rank 0 crashes after step 1" in report and "error_file" in report
    # Console: rank 0's stderr, prefixed by --tee; nothing of rank 1.
    assert "[default0]:import time:" in result.stderr
    assert "[default1]:" not in result.stderr
    (attempt,) = (tmp_path / "logs").glob("*/attempt_0")
    assert "import time:" in (attempt / "1" / "stderr.log").read_text()
    error = json.loads((attempt / "0" / "error.json").read_text())
    assert "RuntimeError: TRAIN_FAULT: rank 0 crashes after step 1" in error["message"]["message"]


@pytest.mark.slow
def test_spawn_equals_single_node(single_node, tmp_path):
    """launch/spawn.py, with a DataLoader worker per rank: the same parameters as torchrun."""
    out = tmp_path / "out"
    spawn = [sys.executable, str(LAUNCH / "spawn.py")]
    result = run_cmd(
        [*spawn, "--nproc", "2", "--", *SHORT, "--workers", "1", "--out-dir", str(out)],
        timeout=120,
    )
    assert_ok(result)
    assert_same_parameters(out, single_node.result())

    # A usage error inside the ranks: one line from rank 0, the rank's exit status.
    missing = tmp_path / "missing.pt"
    bad = run_cmd([*spawn, "--nproc", "2", "--", *SHORT, "--resume", str(missing)], timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count(f"error: {missing}: no such checkpoint file") == 1
    # The same run again into its --out-dir: refused, and mp.spawn's SIGTERM to the other
    # rank leaves no "leaked semaphore" warning (its tqdm lock) after the line.
    again = run_cmd([*spawn, "--nproc", "2", "--", *SHORT, "--out-dir", str(out)], timeout=120)
    assert again.returncode == 2 and "holds a previous run" in again.stderr, again.stderr
    assert "leaked semaphore" not in again.stderr, again.stderr
    # A bad flag is caught before anything is spawned.
    bad = run_cmd([*spawn, "--", "--epochs", "0"], timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: argument --epochs")


@pytest.mark.slow
def test_slurm_one_node_job_runs(single_node, fakes, tmp_path):
    """The batch script, under a fake srun that really executes multi_node.sh on this node."""
    out = tmp_path / "out"
    env = {
        **slurm_env(fakes, ["localhost"], "7"),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "RDZV_PORT": str(free_port()),
        "NPROC": "2",
        "BACKEND": "gloo",
        "GLOO_SOCKET_IFNAME": LOOPBACK,
    }
    result = run_cmd(
        [str(LAUNCH / "slurm.sbatch"), *SHORT, "--out-dir", str(out)], timeout=120, env=env
    )
    assert_ok(result)
    assert_same_parameters(out, single_node.result())


@pytest.mark.slow
def test_slurm_job_preempted_by_usr1_saves_requeues_and_resumes(single_node, fakes, tmp_path):
    """SIGUSR1 to the batch script, as `#SBATCH --signal=B:USR1@90` sends it: srun passes it
    to every process of the step, the ranks stop after the same step with a checkpoint and
    exit 0 (the agent ignores it), and the script requeues the job. The requeued job (the
    same script again) resumes and ends with the single-node run's parameters."""
    out = tmp_path / "out"
    env = {
        **slurm_env(fakes, ["localhost"], "7"),
        "PYTHON": sys.executable,
        "RDZV_PORT": str(free_port()),
        "NPROC": "2",
        "BACKEND": "gloo",
        "GLOO_SOCKET_IFNAME": LOOPBACK,
    }
    argv = [str(LAUNCH / "slurm.sbatch"), *SHORT, "--log-every", "1", "--out-dir", str(out)]
    deadline = time.monotonic() + 120
    job = Live(argv, {**env, "TRAIN_SLOW": "step:1"})  # 1 s per step: time to signal
    assert job.wait_for(r"^step 1 ", deadline), job.output()
    job.proc.send_signal(signal.SIGUSR1)
    assert job.finish(deadline) == 0, job.output()
    text = job.output()
    stop = re.search(r"preempted by SIGUSR1: stopped after step (\d) of 4", text)
    assert stop and "preempted: job 7 goes back into the queue" in text, text
    assert recorded(fakes, "scontrol") == ["requeue", "7"]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == int(stop.group(1)) < 4

    again = run_cmd(argv, timeout=120, env={**env, "RDZV_PORT": str(free_port())})
    assert_ok(again)
    assert f"resumed from {out / 'checkpoints'}" in again.stdout
    assert_same_parameters(out, single_node.result())


def _netns_available() -> str | None:
    """Why the namespace variant cannot run here, or None if it can."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    name = f"ddp-probe-{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@pytest.mark.slow
def test_two_nodes_in_network_namespaces_equal_single_node(single_node, tmp_path):
    """Two network namespaces joined by a veth pair: the "nodes" have their own addresses
    (10.213.7.1 and .2) and interfaces, as separate machines would. Each agent is told
    only IFNAME; multi_node.sh derives its address, and node A hosts the rendezvous."""
    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 100000
    nodes = {f"ddp{tag}a": "10.213.7.1", f"ddp{tag}b": "10.213.7.2"}
    (ns_a, addr_a), (ns_b, addr_b) = nodes.items()
    setup = [["ip", "link", "add", f"v{ns_a}", "type", "veth", "peer", "name", f"v{ns_b}"]]
    for ns, addr in nodes.items():
        setup += [
            ["ip", "link", "set", f"v{ns}", "netns", ns],
            ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", f"v{ns}"],
            ["ip", "-n", ns, "link", "set", f"v{ns}", "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ]
    out = tmp_path / "out"
    # A fixed port is safe here: nothing else lives in a namespace this test just created.
    env = {"NNODES": "2", "NPROC": "1", "BACKEND": "gloo", "RDZV_ENDPOINT": f"{addr_a}:29400"}
    created = []
    try:
        for ns in nodes:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            created.append(ns)
        for cmd in setup:
            subprocess.run(cmd, check=True, capture_output=True)
        argv = [str(LAUNCH / "multi_node.sh"), *SHORT, "--out-dir", str(out), "--timeout", "60"]
        with ThreadPoolExecutor(2) as pool:
            agents = [
                pool.submit(
                    run_cmd,
                    ["ip", "netns", "exec", ns, *argv],
                    timeout=180,
                    env={**UNSET, **env, "PYTHON": sys.executable, "IFNAME": f"v{ns}"},
                )
                for ns in nodes
            ]
            results = [agent.result() for agent in agents]
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for result in results:
        assert_ok(result)
    assert sum("2 rank(s), gloo on cpu" in r.stdout for r in results) == 1
    assert_same_parameters(out, single_node.result())
