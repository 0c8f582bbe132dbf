"""What a newcomer meets first: the terminal output, a re-run into the same --out-dir, a usage
error under torchrun, and the threads each script picks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import train_ddp
import train_dp
from core import dist as commdist
from core.dist import choose_threads
from core.errors import run_cli
from tests.multiproc import PYTHON, ROOT, run_world, torchrun
from tests.terminal import run_in_pty, screen

TINY = ["--train-size", "128", "--eval-size", "32", "--batch-size", "32", "--epochs", "1"]


def _numbers_blurred(line: str) -> str:
    """The rate in the last line varies from run to run; everything else is deterministic."""
    return re.sub(r"[\d.]+ samples/s", "N samples/s", line)


def test_log_lines_and_progress_bar_share_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Under a pseudo-terminal the bar is drawn (stderr is a TTY) and every log line still
    reads whole: the screen holds exactly the lines that output to a pipe or a file holds, in
    the same order (here: the same run in this process, whose captured stdout and stderr are
    not TTYs). Before, the logger wrote to stdout over the bar tqdm kept on the same line."""
    argv = [*TINY, "--train-size", "256", "--epochs", "2", "--log-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    code, raw = run_in_pty(
        [PYTHON, "train_dp.py", *argv, "--out-dir", str(tmp_path / "tty")], env, ROOT, 120
    )
    assert code == 0, raw
    assert "epoch 0:" in raw and "it/s]" in raw  # the bar was there
    train_dp.main([*argv, "--out-dir", str(tmp_path / "pipe")])
    piped = capsys.readouterr()
    assert "it/s" not in piped.out + piped.err  # no bar, no control characters off a TTY
    assert "\r" not in piped.out + piped.err
    expected = [_numbers_blurred(line) for line in piped.out.splitlines()]
    shown = [_numbers_blurred(line.replace(str(tmp_path / "tty"), str(tmp_path / "pipe")))
             for line in screen(raw)]  # fmt: skip
    assert shown == expected
    assert expected[0] == "1 intra-op thread(s) per process (OMP_NUM_THREADS=1)"


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_out_dir_reuse(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A finished job run again with --resume auto does nothing, says so, and keeps its
    summary.json byte for byte and its TensorBoard folder as it was; a new run into a used
    --out-dir is refused in one line before anything is written; --overwrite starts over and
    ends where a run into an empty folder ends."""
    out = tmp_path / "job"
    argv = [*TINY, "--out-dir", str(out), "--resume", "auto"]
    first = train_dp.main(argv)
    text = (out / "summary.json").read_bytes()
    events = sorted(p.name for p in (out / "tb").iterdir())
    capsys.readouterr()

    again = train_dp.main(argv)
    assert again == first
    assert (out / "summary.json").read_bytes() == text
    assert sorted(p.name for p in (out / "tb").iterdir()) == events  # no second event file
    assert "nothing to do:" in capsys.readouterr().out

    assert run_cli(train_dp.main, [*TINY, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --out-dir {out} holds a previous run")
    assert (out / "summary.json").read_bytes() == text  # refused before anything was touched

    stale = out / "checkpoints" / "step-00000099.pt"
    stale.write_bytes(b"an older run's checkpoint")
    sharded = out / "checkpoint.dcp"  # a sharded mode's pointer (training/sharded.py)
    sharded.symlink_to("checkpoints/step-00000099.dcp")
    fresh = train_dp.main([*TINY, "--out-dir", str(out), "--overwrite"])
    assert not stale.exists()
    assert not sharded.is_symlink()  # left, a later --resume auto would follow it
    assert len(list((out / "tb").iterdir())) == 1
    assert fresh["param_checksum"] == first["param_checksum"]
    assert (
        run_cli(train_dp.main, [*TINY, "--out-dir", str(out), "--overwrite", "--resume", "auto"])
        == 2
    )


def test_run_cli_error_file(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    """A usage error never reaches torchelastic's `record` (no traceback in the error file):
    rank 0 prints one line and leaves that line as its error file, in the format torchrun's
    report reads; other ranks stay silent but leave the same error file (torchrun may name
    any of them as the root cause). A crash still gets record's traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "0")
    assert run_cli(train_ddp.main, ["--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    line = "error: argument --batch-size: must be a positive integer, got 0 (see --help)"
    assert err == line + "\n"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == line

    error_file.unlink()
    monkeypatch.setenv("RANK", "1")
    assert run_cli(train_ddp.main, ["--batch-size", "0"]) == 2
    assert capsys.readouterr().err == ""
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == line

    def crash(argv):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_cli(crash)
    assert (
        "RuntimeError: boom"
        in json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"]
    )


@pytest.mark.slow
def test_usage_error_under_torchrun(tmp_path: Path) -> None:
    """Under torchrun: one `error:` line from rank 0 and no traceback of ours; torchrun's own
    report names a rank as the root cause with that line. torchrun itself exits 1 after any
    failed worker and prints its report after a traceback through its own frames
    (torch/distributed/run.py raises ChildFailedError): that part is torchrun's, and the
    test pins it so that docs/launching.md stays true."""
    for flags, line in (
        (["--batch-size", "0"], "error: argument --batch-size: must be a positive integer"),
        (["--resume", str(tmp_path / "missing.pt")], f"error: {tmp_path}/missing.pt: no such"),
    ):
        r = torchrun(["train_ddp.py", *flags, "--out-dir", str(tmp_path / "o")])
        assert r.returncode == 1
        ours = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(ours) == 1 and ours[0].startswith(line)
        assert r.stderr.count("Traceback") == 1  # torchrun's own ChildFailedError
        report = r.stderr.split("Root Cause")[1]
        # torchrun names the first rank to exit, which under load may be a silent one: every
        # rank leaves the line as its error file, so the report shows it whichever it names.
        assert "(local_rank: " in report
        assert f"traceback : {ours[0]}" in report
        assert 'train_ddp.py", line' not in r.stderr  # no frame of ours anywhere


def test_choose_threads(monkeypatch) -> None:
    """OMP_NUM_THREADS wins; otherwise the cores are shared between this node's processes and
    their loader workers, never fewer than one each; a GPU run keeps torch's default."""
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(commdist, "usable_cores", lambda: 8)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert choose_threads(2).startswith("4 intra-op thread(s) per process (8 core(s) / 2 ")
        assert torch.get_num_threads() == 4
        assert choose_threads(2, workers=1).startswith("2 intra-op")
        assert choose_threads(16).startswith("1 intra-op")
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert choose_threads(2) == "3 intra-op thread(s) per process (OMP_NUM_THREADS=3)"
        assert torch.get_num_threads() == 3
        assert "torch's default" in choose_threads(1, device="cuda")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "module",
    [
        "train_dp", "train_ddp", "study.gather_scatter", "study.collectives", "study.bench",
        "benchmarks.bench_sync", "benchmarks.bench_dp_ddp", "benchmarks.learning_check",
        "benchmarks.dp_ddp_drift",
    ],
)  # fmt: skip
def test_help_is_complete(module: str, capsys: pytest.CaptureFixture) -> None:
    """--help: the description is whole sentences (the docstring's first paragraph, not its
    first line), no default is shown twice or as None, and no flag or path is split at a
    hyphen by the line wrapping."""
    import importlib

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_:
        (mod.parse_args if hasattr(mod, "parse_args") else mod.main)(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.rstrip().endswith((".", ":", "?")), description
    assert "(default: None)" not in text
    for line in text.splitlines():
        assert line.count("default") <= 1 or "(default" not in line, line
        assert not line.rstrip().endswith("-") or line.rstrip().endswith(" -"), line


def test_bench_plot_panels(tmp_path: Path) -> None:
    """bench.png: time and bus bandwidth, both log-log, ticked at the measured sizes in the
    table's units, with gloo's all_reduce and the hand-made ring drawn bold."""
    from study.bench import HIGHLIGHT, plot

    ops = ["all_reduce", "ring_all_reduce", "broadcast"]
    sizes = [1 << k for k in range(10, 27, 2)]
    rows = [
        {"op": op, "bytes": n, "time_us": 50 + n / 1e3, "busbw_gbs": n / (50 + n / 1e3) / 1e3}
        for n in sizes
        for op in ops
    ]
    fig = plot(rows, tmp_path / "bench.png", "2 ranks, gloo")
    assert (tmp_path / "bench.png").stat().st_size > 0
    time_ax, bw_ax = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["time per call (us)", "bus bandwidth (GB/s)"]
    for ax in fig.axes:
        assert ax.get_xscale() == ax.get_yscale() == "log"
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["1K", "4K", "16K", "64K", "256K", "1M", "4M", "16M", "64M"]
        widths = {line.get_label(): line.get_linewidth() for line in ax.get_lines()}
        assert min(widths[op] for op in HIGHLIGHT) > 2 * widths["broadcast"]
    assert time_ax.get_lines()[0].get_ydata()[0] == rows[0]["time_us"]


def _ddp_twice(rank: int, world_size: int, out: str) -> tuple:
    """One job run twice with the same command, then a new run into its folder."""
    from core.errors import UsageError

    argv = [*TINY, "--batch-size", "16", "--out-dir", out, "--resume", "auto"]
    first = train_ddp.main(argv)
    # rank 0 wrote summary.json before it returned (the other ranks may be back sooner)
    text = Path(out, "summary.json").read_bytes() if rank == 0 else b""
    again = train_ddp.main(argv)
    refused = None
    try:
        train_ddp.main([*TINY, "--batch-size", "16", "--out-dir", out])
    except UsageError as e:
        refused = str(e)
    kept = rank != 0 or text == Path(out, "summary.json").read_bytes()
    return first, again, kept, refused


@pytest.mark.slow
def test_out_dir_reuse_on_two_ranks(tmp_path: Path) -> None:
    """On two ranks: rank 0 reads the finished job's summary and every rank gets it (nobody
    walks into a training loop alone); rank 0's verdict on a used --out-dir reaches both."""
    results = run_world(_ddp_twice, 2, str(tmp_path / "job"), timeout=120)
    for rank, (_, again, _, refused) in enumerate(results):
        assert again == results[0][0], rank
        assert refused is not None and refused.startswith(f"--out-dir {tmp_path / 'job'} holds")
    assert results[0][2]  # summary.json byte for byte, after the second run and the refusal
