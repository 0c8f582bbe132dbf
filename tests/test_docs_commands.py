"""Every command the pages show (README.md, docs/, pitfalls/README.md) runs as written, from a
fresh shell in which the quick start's `source .venv/bin/activate` has been done.

The default test reads the commands and checks, without running them, that each one is
known below, that the programs and files it names exist, and that every flag it passes to
one of this repository's scripts is defined by that script, and that no two of them start a
training run in the same --out-dir (the second would be refused). The slow test runs them
as a reader copies them: page after page, in page order, in one copy of the checkout
(symlinks, so that `runs/` and `bench_out/` land in a temporary folder) that nothing cleans
in between, with flags appended that make each short (fewer steps, smaller sizes: argparse
takes the last value of a repeated flag). A new command on a page fails the default test until it
is listed in RUN or NOT_RUN here."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from tests.doc_commands import ROOT, all_commands, commands, runs
from tests.doc_figures import PRINTED_BY, figure
from tests.multiproc import run_with_deadline

TRAIN = "--max-steps 3 --train-size 512 --eval-size 64"
# (regular expression on the command, what the test appends, exit statuses that mean "ran")
SHORTEN: list[tuple[str, str, tuple[int, ...]]] = [  # the first match wins
    (r"^diff -u ", "", (1,)),  # the two scripts differ: that is the point
    (r"python -m pytest ", "--collect-only -q", (0,)),  # pytest inside pytest: collect only
    (r"TRAIN_FAULT=kill:1:7 ", "--max-steps 9 --train-size 1024 --eval-size 64", (0,)),
    (r"(train_dp|train_ddp)\.py --help$", "", (0,)),
    (r"launch/fault_tolerant\.sh", "--max-steps 3 --train-size 512 --no-eval", (0,)),
    (r"benchmarks\.bench_fault_tolerance", "--steps 4 --kill-at 2 --save-every 1", (0,)),
    (r"(train_dp|train_ddp)\.py|launch/(cpu_sim|multi_gpu|multi_node)\.sh|launch/spawn\.py",
     TRAIN, (0,)),  # fmt: skip
    (r"study\.bench", "--max-bytes 4K --iters 1 --warmup 0", (0,)),
    # The gpt rows of `make bench`: a 1-block gpt on 32-byte windows, the same code paths.
    (r"benchmarks\.bench_sync --model gpt",
     "--steps 1 --rounds 1 --warmup 1 --gpt-layers 1 --context 32", (0,)),
    (r"benchmarks\.bench_zero --model gpt",
     "--steps 1 --rounds 1 --warmup 1 --gpt-layers 1 --context 32 --modes ddp zero3", (0,)),
    (r"benchmarks\.bench_compile --model gpt",
     "--steps 1 --rounds 1 --modes ddp --compile-backend aot_eager --batch-size 2 "
     "--gpt-layers 1 --context 32", (0,)),
    (r"benchmarks\.bench_sync", "--steps 1 --rounds 1 --warmup 1", (0,)),
    (r"benchmarks\.bench_dp_ddp", "--steps 1 --repeats 1 --warmup 1", (0,)),
    (r"benchmarks\.bench_zero", "--steps 1 --rounds 1 --warmup 1", (0,)),
    (r"benchmarks\.bench_compile",
     "--steps 1 --rounds 1 --modes ddp --compile-backend aot_eager --batch-size 2", (0,)),
    (r"benchmarks\.bench_goals", "--rounds 1 --ring-mib 1 --steps 1 --model mlp", (0,)),
    (r"benchmarks\.bench_topology",
     "--max-bytes 4K --iters 1 --rounds 1 --warmup 0 --inter-node-gbps 1", (0,)),
    (r"benchmarks\.dp_ddp_drift", "--steps 2", (0,)),
    (r"benchmarks\.bench_shm", "--sizes 64K --rounds 1 --iters 1", (0,)),
    (r"study\.simulate .*--topology", "--world 8 --topology 2x4", (0,)),  # hsdp's layout
    (r"study\.simulate", "--world 8 --sync zero3", (0,)),
    (r"benchmarks\.bench_async_save", "--model mlp --steps 2 --save-every 1 --rounds 1", (0,)),
    (r"benchmarks\.bench_compress_sync", "--models cnn --ranks 1 --steps 1 --rounds 1", (0,)),
    (r"benchmarks\.bench_compress\b",
     "--ranks 1 --modes allreduce+powersgd-r1 -- --max-steps 3 --train-size 512 --eval-size 64",
     (0,)),
    (r"benchmarks\.learning_gpt", "--min-gap -9 -- --max-steps 3 --eval-size 4 --sample 8", (0,)),
    (r"benchmarks\.learning_check",
     "--seeds 0 --worlds 1 --epochs 1 --min-first 0 -- --train-size 512 --eval-size 64", (0,)),
    (r"study\.collectives|study\.gather_scatter", "", (0,)),
    (r"study\.cost_model predict ", "", (0,)),
    (r"study\.cost_model extrapolate ", "--plot cost-model.png", (0,)),  # not over docs/
    (r"study\.timeline ", "", (0,)),  # reads the traced run of the command before it
    (r"pitfalls/collective_mismatch\.py", "", (0,)),  # ends after its 3 s timeout
    (r"GLOO_SOCKET_IFNAME=eth9 .*tools\.doctor", "--timeout 3", (1,)),  # the error it shows
    (r"tools\.doctor", "--mib 1", (0,)),
    (r"pitfalls/\S+\.py --wrong", "", (0, 1)),  # 1: the failure it demonstrates happened
    (r"pitfalls/\S+\.py --right", "", (0,)),
]  # fmt: skip
# Commands that cannot run on this machine, and what stands in for them.
NOT_RUN = {
    "make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu":
        "the CPU index is not reachable here; `make -n` checks the recipe",
    "NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=exp1 launch/multi_node.sh --epochs 10 "
    "--out-dir runs/nodes":
        "needs a second machine called node0; the one-machine try-out in docs/launching.md runs",
    "sbatch launch/slurm.sbatch --epochs 10 --out-dir runs/slurm":
        "needs SLURM; tests/test_launch_scripts.py runs it with stand-ins for srun and scontrol",
    "torchrun --standalone --nproc-per-node gpu -m study.bench --max-bytes 1G":
        "needs GPUs (NCCL)",
    "tensorboard --logdir runs": "a server that runs until stopped; `tensorboard --help` runs",
    "python -m tests.doc_figures --write":
        "rewrites the pages, and the sandbox's are links to the checkout's; "
        "tests/test_docs_figures.py runs its check and its rewrite",
    "python -m tools.convert":
        "the tool named in a sentence; docs/ddp-to-fsdp.md shows it with its arguments",
    "python -m tools.convert runs/x/checkpoints/step-00000012.dcp runs/x/full.pt":
        "needs the page's sharded run runs/x; tests/test_training_sharded.py converts one",
    "python -m tools.frdiff runs/flight-recorder":
        "reads the dumps of the lab's flight run before it; the lab runs it itself, and "
        "tests/test_tools_hangs.py checks its report",
    "python -m torch.distributed.flight_recorder.fr_trace runs/flight-recorder":
        "torch's analyser, shown crashing on the lab's gloo dumps; needs those dumps",
    "python train_dp.py --resume runs/x/full.pt --out-dir runs/x-dp ...":
        "continues the converted run above; tests/test_training_sharded.py resumes one",
    "python -m study.cost_model fit bench_out/model/w4/bench.csv":
        "reads what `make model` measured; tests/test_study_cost_model.py runs it on made-up data",
    "python -m study.cost_model pick bench_out/model/w4/bench.csv --world 4":
        "reads what `make model` measured; tests/test_study_cost_model.py runs it on made-up data",
    "python -m study.cost_model ddp bench_out/model/w2/bench.csv bench_out/model/ddp-w2":
        "reads what `make model` measured; tests/test_study_cost_model.py runs it on made-up data",
    "python -m study.cost_model ddp bench_out/model/w4/bench.csv bench_out/model/ddp-w4":
        "reads what `make model` measured; tests/test_study_cost_model.py runs it on made-up data",
}  # fmt: skip
TWO_TERMINALS = "launch/multi_node.sh --epochs 1 --out-dir runs/two-nodes --overwrite"


def plan(cmd: str) -> tuple[str, tuple[int, ...]]:
    """The shell line the slow test runs for `cmd`, and the exit statuses it accepts."""
    if cmd.startswith("make "):
        return f"{cmd.replace('make ', 'make -n ', 1)} >/dev/null", (0,)
    if cmd.startswith("source "):
        return f"{cmd} && python -c 'import torch, torchvision, tqdm' && command -v torchrun", (0,)
    if cmd.startswith("tensorboard "):
        return "tensorboard --help >/dev/null", (0,)
    if "launch/multi_gpu.sh" in cmd:  # no GPU here: its CPU try-out (docs/launching.md)
        cmd = f"NPROC=2 BACKEND=gloo {cmd}"
    for pattern, extra, codes in SHORTEN:
        if re.search(pattern, cmd):
            line = f"{cmd} {extra}".strip()
            if TWO_TERMINALS in cmd:  # both "nodes" at once, on a free port
                line = line.replace("127.0.0.1:29400", f"127.0.0.1:{_free_port()}")
                return f"{line} & pid=$!; {line}; wait $pid", codes  # $!: %1 may be gone once done
            return line, codes
    raise AssertionError(f"no plan for {cmd!r}: add it to SHORTEN or NOT_RUN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = all_commands()


def test_pages_have_their_commands() -> None:
    """The extraction sees the commands a reader sees (a guard against a parser that
    silently finds nothing)."""
    found = {cmd for _, cmd in CASES}
    assert len(found) >= 40
    assert "source .venv/bin/activate" in commands("README.md")
    assert "python -m study.gather_scatter" in found
    assert any("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun" in c for c in found)


def test_no_two_commands_start_a_run_in_one_out_dir() -> None:
    """Copied in page order into one clone, no command is refused because an earlier one left
    its run in the --out-dir (an --out-dir flag on the page, else the script's default; a
    make target: its recipe's): each run has a folder of its own, or replaces it with
    --overwrite."""
    first: dict[str, str] = {}
    clashes = []
    for page, cmd in CASES:
        for out, overwrite in runs(cmd):
            if out in first and not overwrite:
                clashes.append(f"{page}: {cmd}: {out} is already {first[out]}'s")
            first.setdefault(out, cmd)
    assert not clashes, "\n".join(clashes)
    # The reading behind it: flags, defaults from the scripts, make recipes, no runs.
    assert runs("python train_dp.py --epochs 1") == [("runs/dp", False)]
    assert runs("launch/cpu_sim.sh 4 --epochs 1") == [("runs/ddp", False)]
    assert runs("python launch/spawn.py --nproc 2 -- --out-dir=runs/s") == [("runs/s", False)]
    assert runs("make demo") == [("runs/demo", True)]
    assert runs("diff -u train_dp.py train_ddp.py") == runs("python train_ddp.py --help") == []
    assert len(first) >= 20


def test_torchrun_commands_choose_their_threads() -> None:
    """torchrun prints a warning box when it starts several processes without
    OMP_NUM_THREADS: every CPU command on the pages sets it (one GPU command does not need
    to; its ranks compute on the GPU)."""
    bare = [
        f"{page}: {cmd}"
        for page, cmd in CASES
        if re.search(r"(^|\s)torchrun\s", cmd)
        and "OMP_NUM_THREADS=" not in cmd
        and "--nproc-per-node gpu" not in cmd
    ]
    assert not bare, "\n".join(bare)


def _defined_flags(entry: Path) -> set[str]:
    """Every --flag string literal in `entry` and in the repository modules it imports,
    transitively (the scripts take their flags from training/cli.py, study/bench.py, ...)."""
    seen, todo, flags = set(), [entry], set()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        text = path.read_text()
        flags |= set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", text))
        packages = "comm|core|parallel|study|tools|data|training|pitfalls|benchmarks"
        pattern = rf"^\s*(?:from|import) ((?:{packages})[\w.]*)(.*)"
        for module, rest in re.findall(pattern, text, re.M):
            folder = ROOT / module.replace(".", "/")
            todo += [folder.with_suffix(".py"), folder / "__init__.py"]
            # from pitfalls import common: a module of the package
            todo += [folder / f"{name}.py" for name in re.findall(r"\w+", rest)]
        if path.name == "spawn.py" or path.name.endswith(".sh"):
            todo.append(ROOT / "train_ddp.py")  # the launchers pass the rest on to it
    return flags


def _entry(words: list[str]) -> tuple[Path, int] | None:
    """The repository script or module the command runs, and where its own flags start."""
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            path = ROOT / (words[i + 1].replace(".", "/") + ".py")
            return (path, i + 2) if path.is_file() else None  # python -m pytest: not ours
        if word.endswith((".py", ".sh")) and (ROOT / word).is_file():
            return ROOT / word, i + 1
    return None


@pytest.mark.parametrize("page, cmd", CASES, ids=[c for _, c in CASES])
def test_command_is_known_and_its_flags_exist(page: str, cmd: str) -> None:
    if cmd in NOT_RUN:
        return
    plan(cmd)  # raises for a command nobody has planned for
    words = shlex.split(cmd.replace("$RANDOM", "0"))
    for word in words:
        if re.fullmatch(r"[\w/.-]+\.(py|sh|sbatch)", word) and not word.startswith("my_"):
            assert (ROOT / word).is_file(), f"{page}: {cmd}: no file {word}"
    found = _entry(words)
    if found is None:
        return
    entry, start = found
    flags = [w.split("=")[0] for w in words[start:] if w.startswith("--") and w != "--"]
    defined = _defined_flags(entry) | {"--help"}
    missing = [f for f in flags if f not in defined]
    assert not missing, f"{page}: {cmd}: {entry.relative_to(ROOT)} defines no {missing}"


def _sandbox(tmp: Path) -> Path:
    """A checkout of symlinks: the scripts and packages of ROOT, its .venv, nothing it wrote."""
    box = tmp / "checkout"
    box.mkdir()
    for item in ROOT.iterdir():
        if item.name not in ("runs", "bench_out", ".git", ".pytest_cache"):
            (box / item.name).symlink_to(item)
    return box


def _bring_your_own(box: Path) -> None:
    """What README's 'Bring your own' section asks the reader to have: my_models.py as the
    README shows it, and a my_images/ folder in the layout it describes."""
    from PIL import Image

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"\n    # my_models\.py\n((?:    .*\n|\n)+?)\n(?! )", readme)
    assert code, "README's my_models.py example not found"
    (box / "my_models.py").write_text("\n".join(line[4:] for line in code.group(1).splitlines()))
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("val", 8)):  # the default batch of 64 fits
        for name in ("cat", "dog"):
            folder = box / "my_images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


RUNNABLE = [(p, c) for p, c in CASES if c not in NOT_RUN]


def program(cmd: str) -> str:
    """What a command runs: its make target, the repository script or module it starts
    (`_entry`), else its first word (source, python -m pytest); diff's files are not run."""
    words = [w for w in shlex.split(cmd) if not re.match(r"^[A-Z][A-Z0-9_]*=", w)]
    if words[0] == "make":
        return " ".join(words[:2])
    entry = _entry(words) if words[0] != "diff" else None
    return words[0] if entry is None else entry[0].relative_to(ROOT).as_posix()


def in_ci(runnable: list[tuple[str, str]]) -> set[int]:
    """The commands CI runs: the first one of each program in page order (every program the
    pages show runs once, as a reader first meets it), every one that prints a figure a page
    quotes, and the run a `study.timeline` after it reads. The rest, variants of a program
    already run (about 10 of the walk's 15 minutes), run with `make test-long`."""
    seen: set[str] = set()
    chosen: set[int] = set()
    for i, (_, cmd) in enumerate(runnable):
        if program(cmd) not in seen or any(re.search(p, cmd) for p in PRINTED_BY.values()):
            chosen.add(i)
        seen.add(program(cmd))
    for i, (_, cmd) in enumerate(runnable):  # a timeline and the run it reads share a tier
        if program(cmd) == "study/timeline.py" and (i in chosen or i - 1 in chosen):
            chosen |= {i, i - 1}
    return chosen


CI = in_ci(RUNNABLE)
WALK = [
    pytest.param(p, c, id=c, marks=() if i in CI else pytest.mark.long)
    for i, (p, c) in enumerate(RUNNABLE)
]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one checkout every command of the slow test runs in, one after the other, as in a
    reader's clone: what a command leaves (runs/, bench_out/) stays for the next."""
    box = _sandbox(tmp_path_factory.mktemp("clone"))
    _bring_your_own(box)
    return box


@pytest.mark.slow
@pytest.mark.parametrize("page, cmd", WALK)
def test_command_runs(page: str, cmd: str, clone: Path, tmp_path: Path) -> None:
    box = clone
    line, codes = plan(cmd)
    venv_bin = str(box / ".venv" / "bin")
    env = {  # a fresh shell: nothing of the test's environment but the basics
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",  # as tests/conftest.py: GPUs stay with the gpu tests
    }
    if not cmd.startswith("source "):  # the quick start's activation, done before
        env.update(PATH=f"{venv_bin}:{env['PATH']}", VIRTUAL_ENV=str(box / ".venv"))
    code, out, err = run_with_deadline(["bash", "-c", line], 300, env, box)
    assert code in codes, (
        f"{page}: {line}\nexit {code}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    )
    # No traceback from a command that worked, except where a crash is what it shows
    # (TRAIN_FAULT kills a rank; torchrun reports it, then restarts the group).
    assert code != 0 or "TRAIN_FAULT" in cmd or "Traceback" not in err, err
    for name, pattern in PRINTED_BY.items():  # a figure it prints: as the page quotes it
        if re.search(pattern, cmd):
            quoted = [s.strip().strip("`") for s in figure(name).splitlines() if s.strip()]
            assert any(s in out for s in quoted), f"{cmd} printed none of {quoted}:\n{out}"
    if "source " not in cmd:
        assert shutil.which("python", path=env["PATH"]) is not None
