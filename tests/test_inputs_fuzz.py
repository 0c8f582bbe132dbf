"""The fuzz set: over three hundred bad command lines, environments, data folders and
checkpoints, generated here, each of which must end in exactly one `error:` line on stderr
and a non-zero exit: no traceback, no silent exit, and (refused before training) no
--out-dir created. Most run in this process through the scripts' real entry point
(`run_cli(main, argv)`: parsing, validation, the run's set-up, the resume); a handful run as
real commands, under torchrun too, where the ranks must agree and end within seconds.
Then issue 25's hostile files and bombs: sharded checkpoint folders carrying a payload in
each file, re-signed (proved live, left unrun), a stride-0 tensor that reads as 10^12
values, /dev/zero and fifos, image folders with a 12000 x 12000 PNG, a truncated image or a
symlink loop, sizes and names no machine or filesystem holds, and the python -m programs'
bounds; and a benchmark launcher SIGKILLed, which must leave no rank behind.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import train_ddp
import train_dp
from core.errors import run_cli
from tests.fake_datasets import _idx, write_cifar10, write_mnist
from tests.multiproc import PYTHON, ROOT, run_cmd, torchrun

pytestmark = pytest.mark.slow

# Tiny runs: a case that is (wrongly) accepted trains two steps of the mlp, not an epoch.
BASE = ["--model", "mlp", "--train-size", "64", "--eval-size", "16", "--batch-size", "8",
        "--no-eval", "--max-steps", "2"]  # fmt: skip
SCRIPTS = {"train_dp.py": train_dp.main, "train_ddp.py": train_ddp.main}

# Bad values by the kind of number a flag takes.
NOT_POSITIVE = ["0", "-1", "1.5", "x", "", "nan", "1e3"]
NOT_COUNT = ["-1", "1.5", "x", "", "inf"]
FLAGS = {
    "--epochs": NOT_POSITIVE,
    "--batch-size": NOT_POSITIVE,
    "--grad-accum": NOT_POSITIVE,
    "--keep": NOT_POSITIVE,
    "--log-every": NOT_POSITIVE,
    "--max-steps": NOT_COUNT,
    "--train-size": [*NOT_COUNT, str(2**31), str(10**18)],
    "--eval-size": [*NOT_COUNT, str(2**31), str(10**18)],
    "--workers": [*NOT_COUNT, "10000"],
    "--warmup-steps": NOT_COUNT,
    "--save-every": NOT_COUNT,
    "--lr": ["0", "-1", "nan", "inf", "-inf", "1e400", "x", ""],
    "--momentum": ["1", "1.3", "5", "-0.1", "nan", "inf", "x"],
    "--weight-decay": ["-1", "nan", "inf", "x"],
    "--eps": ["0", "-1", "nan", "inf"],
    "--seed": ["-1", str(2**32), str(2**64), "1.5", "x"],
    "--dataset": ["bogus"],
    "--optimizer": ["bogus"],
    "--amp": ["bogus"],
    "--dtype": ["float16"],
    "--lr-schedule": ["bogus"],
    "--model": ["bogus", "no.such.module:f", "os:getcwd", "math:pi", "train_dp:nothing"],
}
DDP_FLAGS = {
    "--timeout": ["0", "-1", str(10**15), "x"],
    "--sync": ["bogus"],
    "--sync-every": NOT_POSITIVE[:4],
    "--backend": ["mpi", "nccl"],  # nccl: no GPU here
}
COMBINATIONS = [
    ["--amp", "fp16"],  # CUDA only
    ["--amp", "bf16", "--dtype", "float64"],
    ["--dataset", "cifar10"],  # no --data-dir
    ["--dataset", "mnist", "--data-dir", "/no/such/dir"],
    ["--download", "--dataset", "synthetic"],
    ["--grad-accum", "10000"],
    ["--batch-size", "1000"],
    ["--betas", "1", "0.9"],
    ["--betas", "0.9", "nan"],
    ["--betas", "0.9"],
    ["--lr"],
    ["--bogus-flag"],
    ["stray-positional"],
    ["--resume", "/no/such/checkpoint.pt"],
    ["--resume", "/"],
    ["--resume", "auto", "--overwrite"],
]
DP_ONLY = [["--gpus", "7"], ["--gpus", "x"], ["--trace-comm"]]
DDP_ONLY = [["--sync-bn"], ["--sync", "zero1", "--amp", "fp16"]]


def cli_cases() -> list[tuple[str, str, list[str]]]:
    cases = []
    for script in SCRIPTS:
        flags = {**FLAGS, **(DDP_FLAGS if script == "train_ddp.py" else {})}
        for flag, values in flags.items():
            # --flag=value: argparse would read a value such as -inf as another flag
            cases += [(script, f"{flag} {v!r}", [f"{flag}={v}"]) for v in values]
        extra = DP_ONLY if script == "train_dp.py" else DDP_ONLY
        cases += [(script, " ".join(c), c) for c in COMBINATIONS + extra]
    return cases


def out_dir_cases(tmp: Path) -> list[tuple[str, Path]]:
    (tmp / "a-file").write_text("not a folder")
    used = tmp / "used"
    (used / "checkpoints").mkdir(parents=True)
    (used / "summary.json").write_text("{}")
    return [
        ("a file", tmp / "a-file"),
        ("under a file", tmp / "a-file" / "run"),
        ("/proc", Path("/proc/no-such-run")),
        ("/dev/null", Path("/dev/null")),
        ("a used run, no --resume", used),
    ]


ENVIRONMENTS = [
    {"WORLD_SIZE": "2", "RANK": "5"},
    {"WORLD_SIZE": "2", "RANK": "-1"},
    {"WORLD_SIZE": "x"},
    {"RANK": "one"},
    {"WORLD_SIZE": "0"},
]


def data_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    """Folders whose first sample loads but whose labels are wrong later on."""
    cases = []
    for name, change in (
        ("cifar10 fewer labels", lambda e: e.update(labels=e["labels"][:-2])),
        ("cifar10 label 10", lambda e: e["labels"].__setitem__(5, 10)),
        ("cifar10 label -1", lambda e: e["labels"].__setitem__(5, -1)),
    ):
        root = tmp / name.replace(" ", "-")
        write_cifar10(root)
        batch = root / "cifar-10-batches-py" / "data_batch_5"
        entry = pickle.loads(batch.read_bytes())
        change(entry)
        batch.write_bytes(pickle.dumps(entry))
        cases.append((name, ["--dataset", "cifar10", "--data-dir", str(root)]))
    for name, labels in (("mnist fewer labels", np.arange(50) % 10), ("mnist label 12", None)):
        root = tmp / name.replace(" ", "-")
        arrays = write_mnist(root)
        if labels is None:
            labels = arrays["train_labels"].copy()
            labels[-1] = 12
        _idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
        cases.append((name, ["--dataset", "mnist", "--data-dir", str(root)]))
    empty = tmp / "empty-data"
    empty.mkdir()
    cases.append(("an empty data folder", ["--dataset", "cifar10", "--data-dir", str(empty)]))
    return cases


class _System:  # a full unpickler would call os.system
    def __reduce__(self):
        return (os.system, ("echo ran",))


class _Anything:
    pass


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


def _pop(key):
    return lambda s: s.pop(key)


def _args(key, value):
    return lambda s: s["args"].__setitem__(key, value)


def _model(fn):
    return lambda s: s.__setitem__("model", {k: fn(v) for k, v in s["model"].items()})


def checkpoint_mutations() -> dict:
    """Ways a checkpoint can hold the required keys and still be wrong, or not be one."""
    cases = {}
    for key in ("model", "optimizer", "scheduler", "epoch", "step", "step_in_epoch",
                "world_size", "args", "rng"):  # fmt: skip
        cases[f"no {key}"] = _pop(key)
        cases[f"{key} None"] = _set(key, None)
        cases[f"{key} a list"] = _set(key, [1, 2])
    for key in ("epoch", "step", "step_in_epoch"):
        for value in (-1, -100, "128", 1.5, True, 10**6):
            cases[f"{key} {value!r}"] = _set(key, value)
    cases["world_size 0"] = _set("world_size", 0)
    cases["args without batch_size"] = lambda s: s["args"].pop("batch_size")
    cases["args.batch_size '4'"] = _args("batch_size", "4")
    cases["args.grad_accum 0"] = _args("grad_accum", 0)
    cases["nan weights"] = _model(lambda v: torch.full_like(v, math.nan))
    cases["one inf weight"] = _model(
        lambda v: v.flatten().index_fill(0, torch.tensor(0), math.inf).view_as(v)
    )  # noqa: E501
    cases["weights of another shape"] = _model(lambda v: v[..., :1])
    cases["weights not tensors"] = _model(lambda v: v.tolist())
    cases["nan momentum"] = lambda s: [
        e.__setitem__("momentum_buffer", torch.full_like(e["momentum_buffer"], math.nan))
        for e in s["optimizer"]["state"].values()
    ]
    cases["optimizer groups not a list"] = lambda s: s["optimizer"].__setitem__("param_groups", 1)
    cases["rng without torch"] = lambda s: s["rng"].pop("torch")
    cases["ranks of another length"] = lambda s: s.__setitem__("ranks", s["ranks"] * 3)
    cases["other lr"] = _args("lr", 0.5)
    return cases


def file_cases(tmp: Path, good: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    files = {}
    for name, data in (
        ("truncated", raw[: len(raw) // 2]),
        ("empty", b""),
        ("garbage", b"\x00not a checkpoint" * 50),
        (
            "flipped bytes",
            raw[: len(raw) // 2]
            + bytes(b ^ 0xFF for b in raw[len(raw) // 2 :][:8])
            + raw[len(raw) // 2 + 8 :],
        ),  # fmt: skip
    ):
        files[name] = tmp / f"{name}.pt"
        files[name].write_bytes(data)
    for name, obj in (
        ("os.system pickle", {"model": _System()}),
        ("arbitrary class", {"model": _Anything()}),
        ("a list", [1, 2, 3]),
        ("a tensor", torch.zeros(3)),
    ):
        files[name] = tmp / f"{name.replace(' ', '-')}.pt"
        torch.save(obj, files[name])
    files["a folder"] = tmp
    files["missing"] = tmp / "missing.pt"
    return files


def _call(main, argv: list[str], env: dict | None = None) -> tuple[int | str, str]:
    """Exit status and stderr of one in-process run; an escaped exception is reported as the
    status 'traceback' (a real command would print one). stderr goes to a real file, as a
    command's does (torchelastic's `record` wants a file descriptor)."""
    with tempfile.TemporaryFile("w+") as err:
        try:
            with (
                redirect_stderr(err),
                redirect_stdout(io.StringIO()),
                mock.patch.dict(os.environ, env or {}),
            ):
                code = run_cli(main, argv)
        except BaseException as e:  # noqa: BLE001 - every escape is what this test counts
            return "traceback", f"{type(e).__name__}: {e}"
        err.seek(0)
        return code, err.read()


def _verdict(code, err: str) -> str | None:
    """None for a proper refusal, else what is wrong with it."""
    if code == "traceback":
        return f"traceback: {err}"
    if code == 0:
        return "accepted (exit 0)"
    lines = err.splitlines()
    if not lines:
        return f"silent exit {code}"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"exit {code}, not one error line: {err!r}"
    return None


def test_two_hundred_bad_inputs_each_get_one_error_line(tmp_path):
    start = time.monotonic()
    outcomes: list[tuple[str, str | None]] = []

    def check(label, main, argv, env=None, out=None, fresh_out=True):
        code, err = _call(main, argv, env)
        problem = _verdict(code, err)
        if problem is None and out is not None and fresh_out and out.exists():
            problem = f"refused, but created --out-dir {out}"
        if problem is None and "weights_only" in err:
            problem = f"advises turning the protection off: {err!r}"
        outcomes.append((label, problem))

    n = 0

    def fresh() -> Path:
        nonlocal n
        n += 1
        return tmp_path / "runs" / f"out{n}"

    for script, label, flags in cli_cases():
        out = fresh()
        argv = [*BASE, *flags] if flags[0].startswith("-") else [*flags, *BASE]
        if "--out-dir" not in flags:
            argv += ["--out-dir", str(out)]
        check(f"{script} {label}", SCRIPTS[script], argv, out=out)
    for label, out in out_dir_cases(tmp_path):
        for script, main in SCRIPTS.items():
            check(f"{script} --out-dir {label}", main, [*BASE, "--out-dir", str(out)])
    for env in ENVIRONMENTS:
        out = fresh()
        check(f"train_ddp.py with {env}", train_ddp.main, [*BASE, "--out-dir", str(out)], env, out)
    out = fresh()
    check("train_dp.py under WORLD_SIZE=2", train_dp.main, [*BASE, "--out-dir", str(out)],
          {"WORLD_SIZE": "2", "RANK": "0"}, out)  # fmt: skip
    for label, flags in data_cases(tmp_path / "data"):
        out = fresh()
        check(f"train_ddp.py {label}", train_ddp.main, [*BASE, *flags, "--out-dir", str(out)],
              out=out)  # fmt: skip

    # Checkpoints: a good one from a tiny run (8 steps an epoch), then broken copies of it.
    good_run = tmp_path / "good"
    tiny = [*BASE[:-2], "--epochs", "1"]
    assert run_cli(train_ddp.main, [*tiny, "--out-dir", str(good_run)]) == 0
    good = good_run / "checkpoints" / "step-00000008.pt"
    resume = [*tiny[:-1], "2"]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for label, mutate in checkpoint_mutations().items():
        state = torch.load(good, weights_only=True)
        mutate(state)
        path = bad_dir / f"{len(outcomes)}.pt"
        torch.save(state, path)
        out = fresh()
        check(f"checkpoint: {label}", train_ddp.main,
              [*resume, "--resume", str(path), "--out-dir", str(out)], out=out)  # fmt: skip
    for label, path in file_cases(bad_dir, good).items():
        for script, main in SCRIPTS.items():
            out = fresh()
            check(f"{script} checkpoint file: {label}", main,
                  [*resume, "--resume", str(path), "--out-dir", str(out)], out=out)  # fmt: skip
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    os.symlink("checkpoints/step-00000099.pt", dangling / "checkpoint.pt")
    check("--resume auto, a dangling checkpoint.pt", train_ddp.main,
          [*resume, "--resume", "auto", "--out-dir", str(dangling)])  # fmt: skip

    # Divergence: stopped in one line, nothing non-finite saved (checked in test_training_guard.py).
    for script, main in SCRIPTS.items():
        out = fresh()
        flags = [*BASE[:-2], "--lr", "1e6", "--log-every", "2", "--save-every", "1"]
        check(f"{script} --lr 1e6", main, [*flags, "--out-dir", str(out)], out=out,
              fresh_out=False)  # fmt: skip

    failed = [f"{label}: {problem}" for label, problem in outcomes if problem]
    assert not failed, f"{len(failed)} of {len(outcomes)} cases:\n" + "\n".join(failed)
    assert len(outcomes) >= 200, len(outcomes)
    print(f"{len(outcomes)} in-process cases in {time.monotonic() - start:.1f} s")


# ---------------------------------------------------------------- real commands

REPO_FRAME = re.compile(r'File ".*/(train_dp|train_ddp)\.py"|File ".*/(training|comm|data)/')


def _one_line(proc, says: str) -> None:
    """One `error:` line (torchrun's own report may quote it as its `traceback :` field),
    a non-zero exit, and no traceback from the project's code."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, (proc.returncode, proc.stderr)
    assert says in errors[0], errors[0]
    assert not REPO_FRAME.search(proc.stderr), proc.stderr


def test_bad_input_under_real_commands_and_torchrun(tmp_path):
    """Fresh interpreters, as users start them; four at once to keep the wall time down.
    Under torchrun, ranks started with different flags end within seconds (their --timeout,
    600 s, is what a collective of another size would wait) with one line naming the flags
    and the ranks; a diverging run stops on every rank at the same log line."""
    flags = [*BASE, "--out-dir"]
    evil = tmp_path / "evil.pt"
    torch.save({"model": _System()}, evil)
    per_rank = (
        f"exec {PYTHON} train_ddp.py {' '.join(BASE)} --out-dir {tmp_path / 'mismatch'} "
        '--lr 0.0$((5 + RANK)) --sync $([ "$RANK" = 0 ] && echo ddp || echo allreduce)'
    )
    jobs = {
        "nan lr": lambda: run_cmd([PYTHON, "train_ddp.py", "--lr", "nan"], timeout=120),
        "rank 5 of 2": lambda: run_cmd(
            [PYTHON, "train_ddp.py", *flags, str(tmp_path / "r5")],
            env={"WORLD_SIZE": "2", "RANK": "5"},
            timeout=120,
        ),
        "mismatch": lambda: torchrun(["--no-python", "sh", "-c", per_rank], timeout=150),
        "diverged": lambda: torchrun(
            [
                "train_ddp.py",
                *BASE[:-2],
                "--lr",
                "1e6",
                "--log-every",
                "2",
                "--save-every",
                "1",
                "--out-dir",
                str(tmp_path / "diverged"),
            ],
            timeout=150,
        ),  # fmt: skip
        "evil": lambda: torchrun(
            ["train_ddp.py", *flags, str(tmp_path / "evil-run"), "--resume", str(evil)],
            timeout=150,
        ),
    }
    start = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        done = {name: f.result() for name, f in futures.items()}
    wall = time.monotonic() - start
    _one_line(done["nan lr"], "argument --lr: must be a finite number above 0, got nan")
    _one_line(done["rank 5 of 2"], "RANK=5 is outside WORLD_SIZE=2")
    _one_line(
        done["mismatch"],
        "the ranks were started with different flags: --lr (rank 0: 0.05; rank 1: 0.06), "
        "--sync (rank 0: 'ddp'; rank 1: 'allreduce')",
    )
    _one_line(done["diverged"], "training diverged: ")
    for path in (tmp_path / "diverged" / "checkpoints").glob("step-*.pt"):
        assert all(bool(torch.isfinite(w).all()) for w in torch.load(path)["model"].values())
    _one_line(done["evil"], "unsupported GLOBAL posix.system")
    assert not (tmp_path / "evil-run").exists() and not (tmp_path / "mismatch").exists()
    assert wall < 150  # far below the 600 s a mismatched collective would wait
    assert ROOT.is_dir()


# ---------------------------------------------------------------- hostile files and bombs


def _pngs(root: Path, n: int = 3) -> Path:
    """An image folder of 16 x 16 PNGs: train/ and val/, classes a and b."""
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                noise = Image.effect_noise((16, 16), 50).convert("RGB")
                noise.save(root / split / cls / f"{i}.png")
    return root


def image_cases(tmp: Path) -> dict[str, Path]:
    """Image folders that fail only at an image after the first."""
    from PIL import Image

    cases = {}
    for kind in ("12000x12000 png", "truncated png", "symlink loop", "file link loop"):
        root = _pngs(tmp / kind.replace(" ", "-"))
        later = root / "train" / "b" / "1.png"
        if kind == "12000x12000 png":
            Image.new("L", (12000, 12000)).save(later)  # 0.14 MB of file, 1.7 GB as floats
        elif kind == "truncated png":
            later.write_bytes(later.read_bytes()[: later.stat().st_size // 2])
        elif kind == "symlink loop":
            (root / "train" / "a" / "up").symlink_to("..")
        else:
            later.unlink()
            later.symlink_to("1.png")
        cases[kind] = root
    return cases


def _dump_with_inf(folder: Path) -> Path:
    folder.mkdir()
    entry = {"collective_seq_id": math.inf, "profiling_name": "gloo:all_reduce",
             "process_group": ["0", ""], "input_sizes": [[4]]}  # fmt: skip
    (folder / "gloo_trace_rank_0").write_bytes(pickle.dumps({"entries": [entry]}))
    return folder


def test_hostile_checkpoint_folders_bombs_and_bounds_each_get_one_line(tmp_path):
    """Issue 25's hostile files, bombs and bounds. Every sharded checkpoint file carries a
    payload, re-signed, proved live (a plain unpickler creates the marker) and inert here
    (refused in one line, no marker) on --resume and in tools.convert, for a mode whose
    checkpoint holds only tensors (zero1) and one with non-tensor items (fsdp2)."""
    from study import bench, cost_model
    from tests import hostile
    from tests.fake_datasets import write_mnist
    from tools import convert, frdiff

    outcomes: list[tuple[str, str | None]] = []
    n = 0

    def check(label, main, argv, out=None, says=None):
        code, err = _call(main, argv)
        problem = _verdict(code, err)
        if problem is None and out is not None and out.exists():
            problem = f"refused, but created {out}"
        if problem is None and says is not None and says not in err:
            problem = f"does not say {says!r}: {err!r}"
        outcomes.append((label, problem))

    def fresh() -> Path:
        nonlocal n
        n += 1
        return tmp_path / "runs" / f"out{n}"

    tiny = [*BASE[:-2], "--epochs", "1"]
    resume = [*tiny[:-1], "2"]
    marker = tmp_path / "marker"
    for mode in ("zero1", "fsdp2"):
        good_run = tmp_path / f"good-{mode}"
        assert run_cli(train_ddp.main, [*tiny, "--sync", mode, "--out-dir", str(good_run)]) == 0
        good = good_run / "checkpoints" / "step-00000008.dcp"
        for kind in hostile.KINDS:
            bad = tmp_path / f"{mode}-{kind.replace(' ', '-')}.dcp"
            hostile.make_hostile(kind, good, bad, marker)
            live = hostile.payload_runs(kind, bad, marker)
            outcomes.append((f"{mode} {kind}: payload live", None if live else "it did not run"))
            out = fresh()
            check(f"{mode} {kind}: --resume", train_ddp.main,
                  [*resume, "--sync", mode, "--resume", str(bad), "--out-dir", str(out)],
                  out=out / "checkpoints", says="nothing was run")  # fmt: skip
            target = tmp_path / f"{mode}-{kind.replace(' ', '-')}.pt"
            check(f"{mode} {kind}: convert", convert.main, [str(bad), str(target)], out=target,
                  says="nothing was run")  # fmt: skip
            if marker.exists():
                outcomes.append((f"{mode} {kind}", "the payload ran"))
                marker.unlink()
        # Corrupt shard bytes, re-signed: DCP's own error, as one line.
        bad = tmp_path / f"{mode}-corrupt.dcp"
        shutil.copytree(good, bad)
        shard = next(bad.glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
        shard.write_bytes(bytes(data))
        hostile._sign(bad)
        out = fresh()
        check(f"{mode} corrupt shard, re-signed: --resume", train_ddp.main,
              [*resume, "--sync", mode, "--resume", str(bad), "--out-dir", str(out)],
              out=out / "checkpoints")  # fmt: skip
        check(f"{mode} corrupt shard, re-signed: convert", convert.main,
              [str(bad), str(tmp_path / f"{mode}-corrupt.pt")])  # fmt: skip

    # The single file: a stride-0 view of one float that reads as 10^12 (the issue's: 10 GB).
    good_run = tmp_path / "good-ddp"
    assert run_cli(train_ddp.main, [*tiny, "--out-dir", str(good_run)]) == 0
    state = torch.load(good_run / "checkpoints" / "step-00000008.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(1).expand(10**6, 10**6)
    bomb = tmp_path / "bomb.pt"
    torch.save(state, bomb)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for label, path, says in (
        ("stride-0 bomb", bomb, "a view that repeats its data"),
        ("/dev/zero", Path("/dev/zero"), "not a regular file (a character device)"),
        ("a fifo", fifo, "not a regular file (a fifo)"),
    ):
        for script, main in SCRIPTS.items():
            out = fresh()
            argv = [*resume, "--resume", str(path), "--out-dir", str(out)]
            check(f"{script} --resume {label}", main, argv, out=out, says=says)

    # Data: image folders that fail after the first image (a whole epoch reads every one);
    # MNIST as .gz only.
    for label, root in image_cases(tmp_path / "images").items():
        for workers in ("0", "2"):
            out = fresh()
            check(f"imagefolder {label}, --workers {workers}", train_ddp.main,
                  [*tiny, "--dataset", "imagefolder", "--data-dir", str(root), "--workers",
                   workers, "--batch-size", "2", "--out-dir", str(out)])  # fmt: skip
    mnist = tmp_path / "mnist-gz"
    write_mnist(mnist)
    for raw in (mnist / "MNIST" / "raw").iterdir():
        raw.with_name(raw.name + ".gz").write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
    out = fresh()
    check("mnist .gz only", train_ddp.main,
          [*BASE, "--dataset", "mnist", "--data-dir", str(mnist), "--out-dir", str(out)],
          out=out, says="holds .gz files")  # fmt: skip

    # Sizes: samples that do not fit in memory, names the filesystem cannot hold.
    for flag in ("--train-size", "--eval-size"):
        for value in ("100000000000", "1000000000"):
            out = fresh()
            check(f"{flag} {value}", train_ddp.main,
                  [*BASE, flag, value, "--out-dir", str(out)], out=out)  # fmt: skip
    for label, long in (
        ("a 300-byte name", tmp_path / ("x" * 300)),
        ("a 5000-byte path", tmp_path.joinpath(*["y" * 200] * 25)),
    ):
        check(f"--out-dir {label}", train_ddp.main, [*BASE, "--out-dir", str(long)])

    # The python -m programs: bounds, files that never end, places that cannot be written.
    for argv in (["--min-bytes", "1000000G"], ["--max-bytes", str(10**15)], ["--nproc", "10000"],
                 ["--iters", str(10**12)], ["--warmup", str(10**12)],
                 ["--step-factor", str(10**12)], ["--out-dir", "/dev/null/bench"],
                 ["--out-dir", str(tmp_path / ("z" * 300))]):  # fmt: skip
        check(f"study.bench {' '.join(argv)}", bench.main, argv)
    with mock.patch.object(bench, "available_memory", lambda: 1 << 30):
        check("study.bench over memory", bench.main, ["--nproc", "4", "--max-bytes", "1G"],
              says="GB of memory")  # fmt: skip
    for argv in (
        ["fit", "/dev/zero"],
        ["fit", str(fifo)],
        ["predict", "--world", "4", "--bytes", "1M", "--gbps", "inf"],
        ["predict", "--world", "4", "--bytes", "1M", "--alpha-us", "nan"],
        ["predict", "--world", str(10**12), "--bytes", "1M"],
        ["extrapolate", "--plot", "/dev/null/x.png"],
        ["extrapolate", "--plot", "/proc/x.png"],
        ["extrapolate", "--plot", str(tmp_path / ("z" * 300) / "x.png")],
    ):
        check(f"study.cost_model {' '.join(argv)}", cost_model.main, argv)
    check("tools.frdiff, a dump holding inf", frdiff.main, [str(_dump_with_inf(tmp_path / "fr"))])
    for target in ("/dev/null/x.pt", "/proc/x.pt", str(tmp_path / ("z" * 300) / "x.pt")):
        check(f"tools.convert to {target[:40]}", convert.main,
              [str(tmp_path / "good-zero1" / "checkpoint.dcp"), target])  # fmt: skip

    failed = [f"{label}: {problem}" for label, problem in outcomes if problem]
    assert not failed, f"{len(failed)} of {len(outcomes)} cases:\n" + "\n".join(failed)
    assert len(outcomes) >= 68, len(outcomes)


def test_no_bench_rank_outlives_its_launcher(tmp_path):
    """`python -m study.bench` starts torchrun, torchrun its ranks; the launcher is then
    SIGKILLed (as the kernel's OOM killer would): torchrun and every rank end within
    seconds."""
    from core.processes import descendants

    argv = [PYTHON, "-m", "study.bench", "--nproc", "2", "--iters", "100000", "--min-bytes",
            "16M", "--max-bytes", "16M", "--out-dir", str(tmp_path)]  # fmt: skip
    launcher = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started = []
    try:
        deadline = time.monotonic() + 120
        while len(started) < 3 and time.monotonic() < deadline:  # torchrun and two ranks
            time.sleep(0.5)
            started = descendants(launcher.pid)
        assert len(started) >= 3, started
        time.sleep(3)  # the ranks are timing
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)]
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hostile_sharded_folder_under_torchrun(tmp_path):
    """At two ranks: every rank reads `.metadata` (the agreement before the load), and a
    non-tensor item fails inside dcp.load on one rank, whose error DCP gathers to all. One
    `error:` line, the payload never run."""
    from tests import hostile

    flags = [*BASE[:-2], "--batch-size", "4", "--sync", "zero1", "--epochs"]
    good = tmp_path / "good"
    done = torchrun(["train_ddp.py", *flags, "1", "--out-dir", str(good)], timeout=150)
    assert done.returncode == 0, done.stderr
    marker = tmp_path / "marker"
    jobs = {}
    for kind in ("metadata", "bytes item"):
        bad = tmp_path / f"{kind.replace(' ', '-')}.dcp"
        hostile.make_hostile(kind, good / "checkpoints" / "step-00000008.dcp", bad, marker)
        assert hostile.payload_runs(kind, bad, marker)
        out = tmp_path / f"out-{kind.replace(' ', '-')}"
        argv = ["train_ddp.py", *flags, "2", "--resume", str(bad), "--out-dir", str(out)]
        jobs[kind] = lambda argv=argv: torchrun(argv, timeout=150)
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs.values()]:
            _one_line(future.result(), "nothing was run")
    assert not marker.exists()
