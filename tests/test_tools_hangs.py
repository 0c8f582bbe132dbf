"""When a job hangs or lies: the desync lab, the flight-recorder reader, the network doctor.

Default: tools.frdiff on synthetic dumps (the format torch 2.14 writes for gloo, reproduced
field by field), its refusal of a pickle that would run code, the lab's monitored_barrier
variant in one 2-rank world (in process), the doctor's checks against their closed forms and
its environment checks. Slow: every lab variant under torchrun, asserted on what it prints,
and the doctor under torchrun: happy path, a wrong GLOO_SOCKET_IFNAME, no rendezvous store.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import socket
import sys
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from core.errors import UsageError
from tests.multiproc import PYTHON, ROOT, run_cmd, run_world, torchrun
from tools import frdiff

# ------------------------------------------------------------------------ tools.frdiff


def _entry(seq: int, op: str, sizes: list, line: int = 10, group: str = "0") -> dict:
    """One collective as torch 2.14's gloo flight recorder records it."""
    return {
        "record_id": seq - 1, "pg_id": 0, "process_group": (group, "default_pg"),
        "collective_seq_id": seq, "p2p_seq_id": 0, "op_id": seq,
        "profiling_name": f"gloo:{op}", "input_sizes": sizes,
        "input_dtypes": ["Float"] * len(sizes), "output_sizes": sizes,
        "output_dtypes": ["Float"] * len(sizes), "state": "scheduled", "retired": True,
        "timeout_ms": 3000, "is_p2p": False,
        "frames": [
            {"name": op, "filename": "/x/site-packages/torch/distributed/distributed_c10d.py",
             "line": 3906},
            {"name": "train", "filename": "/home/me/job.py", "line": line},
        ],
    }  # fmt: skip


def _write(folder: Path, rank: int, entries: list[dict], ranks: str = "[0, 1]") -> None:
    dump = {
        "version": "2.10",
        "pg_config": {"": {"name": "", "desc": "", "ranks": ranks}},
        "pg_status": {"0": {"last_enqueued_collective": len(entries)}},
        "entries": entries,
    }
    (folder / f"gloo_trace_rank_{rank}").write_bytes(pickle.dumps(dump))


def _report(folder: Path) -> tuple[str, int]:
    out = io.StringIO()
    with redirect_stdout(out):
        status = frdiff.main([str(folder)])
    return out.getvalue(), status


def test_frdiff_finds_the_first_mismatch_and_its_lines(tmp_path: Path) -> None:
    _write(tmp_path, 0, [_entry(1, "all_reduce", [[4]]), _entry(2, "all_reduce", [[4]], 20)])
    _write(tmp_path, 1, [_entry(1, "all_reduce", [[4]]), _entry(2, "broadcast", [[1]], 22)])
    text, status = _report(tmp_path)
    assert status == 1
    assert "first mismatch at collective #2:" in text
    assert "rank 0: all_reduce([4]) Float at /home/me/job.py:20 (train)" in text
    assert "rank 1: broadcast([1]) Float at /home/me/job.py:22 (train)" in text
    assert "never reached" not in text


def test_frdiff_names_the_rank_that_never_reached_a_collective(tmp_path: Path) -> None:
    three = [_entry(s, "all_reduce", [[4]], 10 + s) for s in (1, 2, 3)]
    _write(tmp_path, 0, [*three, _entry(4, "barrier", [[1]], 40)], "[0, 1, 2]")
    _write(tmp_path, 1, three, "[0, 1, 2]")
    text, status = _report(tmp_path)
    assert status == 1
    assert "rank 1 never reached collective #4 (its last was #3); rank 0 called barrier" in text
    assert "rank 2: no dump" in text  # pg_config says the group has 3 ranks
    assert "first mismatch" not in text  # #1..#3 agree


def test_frdiff_marks_the_odd_rank_out_and_passes_agreeing_ranks(tmp_path: Path) -> None:
    for rank in range(3):
        size = [[5]] if rank == 2 else [[4]]
        _write(tmp_path, rank, [_entry(1, "all_reduce", size)], "[0, 1, 2]")
    text, status = _report(tmp_path)
    assert status == 1
    assert re.search(r"rank 2: all_reduce\(\[5\]\).*<- differs", text)
    assert "rank 0: all_reduce([4]) Float at /home/me/job.py:10 (train)\n" in text
    same = tmp_path / "same"
    same.mkdir()
    for rank in range(2):
        _write(same, rank, [_entry(s, "all_reduce", [[4], [2, 3]]) for s in (1, 2)])
    text, status = _report(same)
    assert status == 0 and "every rank called the same 2 collective(s) up to #2" in text
    assert "all_reduce([4], [2, 3])" in text


def test_frdiff_refuses_code_and_bad_input(tmp_path: Path) -> None:
    """A dump is untrusted: a pickle that would call os.system is refused before anything
    runs; a folder without dumps, a truncated file, a wrong structure: one error each."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "gloo_trace_rank_0").write_bytes(pickle.dumps({"entries": [Exploit()]}))
    with pytest.raises(UsageError, match="refusing the global .*system"):
        frdiff.main([str(evil)])
    assert not marker.exists()
    cases = {
        "missing": (None, "is not a folder"),
        "empty": (b"", "not a flight-recorder dump"),
        "cut": (pickle.dumps({"entries": []})[:-3], "not a flight-recorder dump"),
        "shape": (pickle.dumps({"entries": [{"collective_seq_id": 1}]}), "entry 0 is malformed"),
        "list": (pickle.dumps([1, 2]), "no list of entries"),
    }
    for name, (data, message) in cases.items():
        folder = tmp_path / name
        if data is not None:
            folder.mkdir()
            (folder / "trace_0").write_bytes(data)
        with pytest.raises(UsageError, match=message):
            frdiff.main([str(folder)])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(mixed, 0, [_entry(1, "all_reduce", [[4]])])
    (mixed / "other_1").write_bytes(b"")
    with pytest.raises(UsageError, match="several prefixes"):
        frdiff.main([str(mixed)])
    text, _ = _report_with_prefix(mixed, "gloo_trace_rank_")
    assert "rank 1: no dump" in text


def _report_with_prefix(folder: Path, prefix: str) -> tuple[str, int]:
    out = io.StringIO()
    with redirect_stdout(out):
        status = frdiff.main([str(folder), "--prefix", prefix])
    return out.getvalue(), status


# ------------------------------------------------------------------- the lab, in process


def _lab_job(rank: int, world_size: int, bug: str, diagnose: str) -> tuple[int, str]:
    """The lab's job on this rank of the harness's group (its 3 s timeout), and its output."""
    sys.path.insert(0, str(ROOT / "pitfalls"))
    from pitfalls import collective_mismatch

    args = Namespace(bug=bug, diagnose=diagnose, timeout=3.0, job=True)
    out = io.StringIO()
    with redirect_stdout(out):
        status = collective_mismatch.job(args)
    return status, out.getvalue()


def test_monitored_barrier_names_the_missing_rank() -> None:
    """One collective on rank 1 only: at the next step's monitored_barrier, rank 0 names rank 1
    after half the timeout, before any collective's own timeout fires."""
    (status0, out0), (status1, out1) = run_world(
        _lab_job, 2, "one-rank", "monitored", timeout=60, pg_timeout=3
    )
    assert "Rank 1 failed to pass monitoredBarrier in 1500 ms" in out0, out0
    assert status0 == 1 and status1 == 0  # rank 0 carries the verdict
    assert "[rank 1] after" in out1  # rank 1 learns it only as a lost connection or timeout


# ---------------------------------------------------------------------------- doctor


def _doctor_checks(rank: int, world_size: int) -> list[dict]:
    import torch.distributed as dist

    from tools.doctor import checks

    # In the job's group, and in a gloo group of its own (what the doctor adds under NCCL).
    side = dist.new_group(backend="gloo")
    return [checks(rank, world_size, mib=0.01), checks(rank, world_size, mib=0.01, group=side)]


@pytest.mark.oracle
def test_doctor_checks_against_closed_forms() -> None:
    results = run_world(_doctor_checks, 3, timeout=60, pg_timeout=10)
    for v in (v for rank in results for v in rank):
        assert v["checksum"] == 6.0 and v["checksum_ok"]  # 1 + 2 + 3 = W(W+1)/2, exact
        assert v["ring_ok"] and v["barrier_s"] >= 0 and v["ring_s"] > 0


def test_doctor_times_a_gpu_from_idle_to_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (pretend) GPU the clock is read only after torch.cuda.synchronize: the work
    queued before is not counted, the kernels launched are. On the CPU nothing waits."""
    import types

    import torch

    from tools import doctor

    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append("sync"))
    clock = types.SimpleNamespace(perf_counter=lambda: seen.append("clock") or 0.0)
    monkeypatch.setattr(doctor, "time", clock)
    doctor._timed(lambda: seen.append("launch"), torch.device("cuda", 0))
    assert seen == ["sync", "clock", "launch", "sync", "clock"]
    seen.clear()
    doctor._timed(lambda: seen.append("launch"), torch.device("cpu"))
    assert seen == ["clock", "launch", "clock"]


@pytest.mark.gpu(2)
def test_doctor_checks_nccl_and_its_gloo_side_group_on_two_gpus() -> None:
    result = torchrun(["-m", "tools.doctor", "--mib", "1"], timeout=180, gpus=True, check=True)
    for rank in range(2):
        for backend in ("nccl", "gloo"):
            assert re.search(
                rf"rank {rank} on .*, {backend}: .*\(sum 3, ok\).*\(ok\)", result.stdout
            )
    assert "doctor: ok (2 rank(s) on 1 host(s), nccl and gloo, checksum 3)" in result.stdout


def test_doctor_backend_defaults_to_what_the_host_has() -> None:
    from tools.doctor import parse_args

    assert parse_args([]).backend is None  # run(): core.dist.default_backend()
    assert parse_args(["--backend", "nccl"]).backend == "nccl"


def test_doctor_names_a_wrong_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.doctor import DoctorError, interfaces, locate

    names = interfaces()
    assert "lo" in names and "127.0.0.1" in names["lo"]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth-none")
    with pytest.raises(DoctorError, match="has no interface 'eth-none' \\(it has: .*lo"):
        locate(spans_nodes=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    place = locate(spans_nodes=False)
    assert place.bind == [("lo", "127.0.0.1")] and place.route == ("lo", "127.0.0.1")
    with pytest.raises(DoctorError, match="spans several nodes.*loopback"):
        locate(spans_nodes=True)
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    with pytest.raises(DoctorError, match="MASTER_ADDR=no-such-host.invalid does not resolve"):
        locate(spans_nodes=False)


# ------------------------------------------------------------------------ slow: torchrun

LAB = str(ROOT / "pitfalls" / "collective_mismatch.py")
# What each variant must print (regular expressions on the lab's whole output).
TIMED_OUT = r"Timed out waiting 3000ms for (send|recv) operation"
PEER_GONE = r".*Connection (closed|reset) by peer"
EXPECTED = {
    ("shape", "none"): [
        r"Received data size doesn't match expected size",
        r"rank 0 was killed by SIGABRT",
        r"rank 1 says: Read error .*Connection reset by peer",
    ],
    ("shape", "detail"): [
        r"rank 0 reports: rank 0 runs ALLREDUCE \[4\] Float .*rank 1 runs ALLREDUCE \[5\] Float",
        r"rank 1 reports: rank 1 runs ALLREDUCE \[5\] Float .*rank 0 runs ALLREDUCE \[4\] Float",
    ],
    ("shape", "monitored"): [
        r"every rank passed each monitored_barrier: it checks presence, not shapes",
        r"rank 0 was killed by SIGABRT",
    ],
    ("shape", "flight"): [
        r"rank 0: no dump",
        r"rank 1: 2 collective\(s\), last #2 all_reduce\(\[5\]\) Float at "
        r"pitfalls/collective_mismatch.py:\d+ \(job\)",
    ],
    ("one-rank", "none"): [
        # Both ranks wait 3 s; under load the one that times out first may exit before the
        # other's own timeout fires, which then sees its peer's socket close instead.
        rf"rank 0 says: ({TIMED_OUT}|{PEER_GONE})",
        rf"rank 1 says: ({TIMED_OUT}|{PEER_GONE})",
    ],
    ("one-rank", "detail"): [
        r"rank 0 reports: rank 0 runs ALLREDUCE \[4\] Float .*rank 1 runs BROADCAST \[1\] Float",
        r"rank 1 reports: rank 1 runs BROADCAST \[1\] Float .*rank 0 runs ALLREDUCE \[4\] Float",
    ],
    ("one-rank", "monitored"): [r"rank 0 names the rank\(s\) that never reached the barrier: 1\n"],
    ("one-rank", "flight"): [
        r"first mismatch at collective #3:\n"
        r" +rank 0: all_reduce\(\[4\]\) Float at pitfalls/collective_mismatch.py:\d+ \(job\)\n"
        r" +rank 1: broadcast\(\[1\]\) Float at pitfalls/collective_mismatch.py:\d+ \(job\)",
    ],
}


def _lab(bug: str, diagnose: str, dump_root: Path):
    argv = [PYTHON, LAB, "--bug", bug, "--diagnose", diagnose]
    argv += ["--dump-dir", str(dump_root / f"{bug}-{diagnose}")]
    return run_cmd(argv, timeout=150)  # the deadline: the lab's own guard is 120 s


@pytest.mark.slow
def test_every_lab_variant_ends_with_its_diagnosis(tmp_path: Path) -> None:
    variants = sorted(EXPECTED)
    with ThreadPoolExecutor(2) as pool:  # two torchrun jobs at a time on the 2-core box
        results = list(pool.map(lambda v: _lab(*v, tmp_path), variants))
    for (bug, diagnose), result in zip(variants, results, strict=True):
        out = result.stdout
        assert result.returncode == 0, (bug, diagnose, out, result.stderr)
        assert f"RESULT pitfall=collective_mismatch bug={bug} diagnose={diagnose}" in out
        assert re.search(r"job_status=[1-9]", out), out  # the job failed, as it should
        for pattern in EXPECTED[bug, diagnose]:
            assert re.search(pattern, out), (bug, diagnose, pattern, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_doctor_under_torchrun() -> None:
    """Happy path; a wrong GLOO_SOCKET_IFNAME; a rank started by hand whose rendezvous store
    nobody serves. Each failure ends with exactly one error line naming its cause."""
    jobs = {
        "ok": lambda: torchrun(["-m", "tools.doctor", "--mib", "1"], timeout=120),
        "ifname": lambda: torchrun(
            ["-m", "tools.doctor", "--timeout", "3"], env={"GLOO_SOCKET_IFNAME": "eth-none"},
            timeout=120,
        ),
        "store": lambda: run_cmd(
            [PYTHON, "-m", "tools.doctor", "--timeout", "1"], timeout=120,
            env={"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())},
        ),
    }  # fmt: skip
    with ThreadPoolExecutor(3) as pool:
        done = {name: pool.submit(job) for name, job in jobs.items()}
        results = {name: future.result() for name, future in done.items()}
    ok = results["ok"]
    assert ok.returncode == 0, ok.stderr
    for rank in range(2):
        assert re.search(rf"rank {rank}/2 \(local {rank}\) on .*: gloo binds \S+ \S+ ", ok.stdout)
        assert re.search(
            rf"rank {rank} on .*\(sum 3, ok\), ring send/recv [\d.]+ ms \(ok\)", ok.stdout
        )
    assert "doctor: ok (2 rank(s) on 1 host(s), checksum 3)" in ok.stdout
    for name, cause in (
        ("ifname", r"GLOO_SOCKET_IFNAME=eth-none: this host \(.*\) has no interface 'eth-none'"),
        ("store", r"rendezvous: no store answered at MASTER_ADDR:MASTER_PORT=127\.0\.0\.1:"),
    ):
        result = results[name]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(errors) == 1, (name, result.stderr)
        assert re.search(cause, errors[0]), (name, errors)
