"""The fuzz set: over three hundred bad command lines, environments, data folders and
checkpoints, generated here, each of which must end in exactly one `error:` line on stderr
and a non-zero exit: no traceback, no silent exit, and (refused before training) no
--out-dir created. Most run in this process through the scripts' real entry point
(`run_cli(main, argv)`: parsing, validation, the run's set-up, the resume); a handful run as
real commands, under torchrun too, where the ranks must agree and end within seconds.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
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
    "--train-size": NOT_COUNT,
    "--eval-size": NOT_COUNT,
    "--workers": NOT_COUNT,
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
