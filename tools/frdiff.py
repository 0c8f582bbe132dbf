"""Which collective did a rank never reach? A reader of flight-recorder dumps, one per rank.

    python -m tools.frdiff runs/flight-recorder

PyTorch's flight recorder (`TORCH_FR_BUFFER_SIZE=N`: keep the last N collectives of every
process group) records, for each collective a rank calls, its sequence number in its group,
the op, the tensor sizes and dtypes, and the Python stack of the call. NCCL dumps it by itself
when a collective times out; gloo records the same entries but never dumps them, so a gloo job
dumps them itself (`torch._C._distributed_c10d._dump_fr_trace`: bytes, the same pickle NCCL
writes), one file per rank named `<prefix><rank>` (`TORCH_FR_DUMP_TEMP_FILE` is the prefix);
pitfalls/collective_mismatch.py shows how. This reads such a folder and prints, per process
group:

* the ranks that never reached a collective another rank called ("rank 1 never reached
  collective #4"), with what the others called there and from which line;
* the first sequence number at which the ranks called different collectives (op, sizes or
  dtypes differ): a desync, with each rank's op and call site;
* ranks with no dump at all (a rank that crashed leaves none).

Exit status, as `diff`'s: 0 when every rank called the same collectives, 1 when something
above was found, 2 for a folder or file that cannot be read (one `error:` line).

Why not torch's own analyser (`python -m torch.distributed.flight_recorder.fr_trace`): in
torch 2.14 it crashes on gloo dumps (`KeyError: ('0', 0)`: it expects NCCL's fields), and it
loads every file with `pickle.load`, which runs whatever code a crafted file asks for. A dump
is untrusted input (it comes off a cluster's scratch space), so this reads it with an
unpickler that refuses every global name: it can build dicts, lists, tuples, strings and
numbers, which is all a dump holds, and nothing that could execute (see `load_dump`).

Two things gloo does not record, so this does not read them: whether a collective
*completed* (gloo leaves every entry `scheduled`, and its `pg_status` counts a timed-out
collective as completed), and point-to-point ops' partners (send/recv are counted, not
matched).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.cli import Parser
from core.errors import UsageError, run_cli

# Names are <prefix><rank>, as torch writes its NCCL dumps (default prefix nccl_trace_rank_).
DUMP_NAME = re.compile(r"^(?P<prefix>.*?)(?P<rank>\d+)$")
MAX_DUMP_BYTES = 256 * 1024 * 1024  # far above any ring buffer's dump; a bound on bad input


class _DataOnly(pickle.Unpickler):
    """Unpickles plain data only. Every way a pickle runs code (REDUCE, BUILD, NEWOBJ, INST,
    OBJ) needs a callable, and the only sources of one are a global name (GLOBAL,
    STACK_GLOBAL, the EXT opcodes: all resolved through `find_class`) or a persistent id
    (`persistent_load`, which the base class refuses). Refusing every name leaves dicts,
    lists, tuples, sets, strings, bytes, numbers, booleans and None."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing the global {module}.{name}: a dump holds data only")


@dataclass(frozen=True)
class Entry:
    """One recorded collective of one rank."""

    seq: int
    op: str
    sizes: tuple
    dtypes: tuple
    where: str  # the first stack frame outside torch: file:line (function)

    def signature(self) -> tuple:
        return (self.op, self.sizes, self.dtypes)

    def describe(self) -> str:
        sizes = ", ".join("[" + ", ".join(str(n) for n in s) + "]" for s in self.sizes)
        dtypes = ",".join(sorted(set(self.dtypes)))
        return f"{self.op}({sizes}) {dtypes} at {self.where}"


@dataclass
class Dump:
    rank: int
    path: Path
    groups: dict[str, dict]  # process-group name -> {"ranks": [...], "entries": {seq: Entry}}
    p2p: int  # point-to-point entries (counted, not matched)


def _site(frames: object) -> str:
    """file:line (function) of the innermost frame that is not torch's own code."""
    if not isinstance(frames, list):
        return "?"
    for frame in frames:
        if not isinstance(frame, dict):
            continue
        filename = str(frame.get("filename", "?"))
        if re.search(r"[/\\]torch[/\\]", filename):
            continue  # distributed_c10d.py, c10d_logger.py: the same for every call
        here = os.getcwd() + os.sep
        if filename.startswith(here):  # this checkout's files, as the reader names them
            filename = filename[len(here) :]
        return f"{filename}:{frame.get('line', '?')} ({frame.get('name', '?')})"
    return "?"


def _ranks_of(config: object) -> list[int] | None:
    """The global ranks of a group, from pg_config's "ranks" ("[0, 1]", or a list)."""
    ranks = config.get("ranks") if isinstance(config, dict) else None
    if isinstance(ranks, str):
        ranks = re.findall(r"-?\d+", ranks)
    try:
        return sorted(int(r) for r in ranks) if ranks is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


def load_dump(path: Path, rank: int) -> Dump:
    """Read one rank's dump (untrusted: data-only unpickling, every field checked)."""
    try:
        size = path.stat().st_size
        if size > MAX_DUMP_BYTES:
            raise UsageError(f"{path}: {size} bytes, larger than any flight-recorder dump")
        raw = _DataOnly(io.BytesIO(path.read_bytes())).load()
    except UsageError:
        raise
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # a truncated or foreign file: any unpickling error
        raise UsageError(f"{path}: not a flight-recorder dump ({type(e).__name__}: {e})") from None
    entries = raw.get("entries") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise UsageError(f"{path}: not a flight-recorder dump (no list of entries)")
    configs = raw.get("pg_config") if isinstance(raw.get("pg_config"), dict) else {}
    groups: dict[str, dict] = {}
    p2p = 0
    for i, e in enumerate(entries):
        try:
            group = e["process_group"][0] if "process_group" in e else str(e["pg_id"])
            if e.get("is_p2p"):
                p2p += 1
                continue
            entry = Entry(
                seq=int(e["collective_seq_id"]),
                op=str(e["profiling_name"]).removeprefix("gloo:").removeprefix("nccl:"),
                sizes=tuple(tuple(int(n) for n in s) for s in e.get("input_sizes", [])),
                dtypes=tuple(str(d) for d in e.get("input_dtypes", [])),
                where=_site(e.get("frames")),
            )
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as err:  # inf
            raise UsageError(
                f"{path}: entry {i} is malformed ({type(err).__name__}: {err})"
            ) from None
        slot = groups.setdefault(str(group), {"ranks": None, "entries": {}})
        slot["entries"][entry.seq] = entry
    for name, slot in groups.items():
        # pg_config is keyed by the group's name; the default group's name is "0" in the
        # entries and "" (torch 2.14) in pg_config.
        config = configs.get(name) or (configs.get("") if name == "0" else None)
        slot["ranks"] = _ranks_of(config)
    return Dump(rank, path, groups, p2p)


def load_dir(folder: Path, prefix: str | None = None) -> list[Dump]:
    """Every rank's dump in `folder`: files named <prefix><rank>."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of flight-recorder dumps")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = DUMP_NAME.match(path.name)
        if not path.is_file() or not match or (prefix is not None and match["prefix"] != prefix):
            continue
        found.setdefault(match["prefix"], {})[int(match["rank"])] = path
    if not found:
        wanted = f"named {prefix}<rank>" if prefix is not None else "named <prefix><rank>"
        raise UsageError(f"{folder}: no dump files {wanted}")
    if len(found) > 1:
        names = ", ".join(sorted(found))
        raise UsageError(
            f"{folder}: dumps with several prefixes ({names}): choose one with --prefix"
        )
    (files,) = found.values()
    return [load_dump(path, rank) for rank, path in sorted(files.items())]


def write_dump(prefix: str, rank: int) -> Path:
    """Write this process's flight-recorder entries (every group, with stacks) to
    `<prefix><rank>`, atomically: what NCCL does on a timeout, done by hand for gloo."""
    import torch.distributed as dist  # noqa: F401  (loads torch's c10d bindings)
    from torch._C import _distributed_c10d as c10d

    # torch >= 2.7 names it _dump_fr_trace; older releases only had the NCCL-named one.
    dump = getattr(c10d, "_dump_fr_trace", None) or c10d._dump_nccl_trace
    data = dump(True, True, False)  # collectives, stack traces, not only the active ones
    path = Path(f"{prefix}{rank}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader never sees half a dump
    return path


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(str(r) for r in ranks)


def compare(dumps: list[Dump]) -> tuple[list[str], bool]:
    """The report's lines, and whether anything is wrong."""
    lines = []
    problem = False
    by_rank = {d.rank: d for d in dumps}
    names = sorted({g for d in dumps for g in d.groups}, key=lambda g: (len(g), g))
    lines.append(f"{len(dumps)} dump(s): {_ranks(sorted(by_rank))}")
    for name in names:
        have = {d.rank: d.groups[name]["entries"] for d in dumps if name in d.groups}
        expected = next((d.groups[name]["ranks"] for d in dumps if name in d.groups), None)
        label = "default group" if name == "0" else f"group {name}"
        members = expected or sorted(have)
        lines.append(f"{label} (ranks {','.join(str(r) for r in members)}):")
        missing = [r for r in members if r not in by_rank]
        if missing:
            problem = True
            lines.append(
                f"  {_ranks(missing)}: no dump (a rank that crashed or was killed leaves none)"
            )
        silent = [r for r in members if r in by_rank and r not in have]
        if silent:
            problem = True
            lines.append(f"  {_ranks(silent)}: no collective of this group recorded")
        for r in sorted(have):
            seqs = have[r]
            last = seqs[max(seqs)]
            lines.append(
                f"  rank {r}: {len(seqs)} collective(s), last #{last.seq} {last.describe()}"
            )
        if len(have) < 2:
            continue
        # The ring buffer keeps the newest N entries: compare the numbers every rank still has.
        top = max(max(s) for s in have.values())
        for r in sorted(have):
            last = max(have[r])
            if last < top:
                problem = True
                step = last + 1
                callers = [q for q in sorted(have) if step in have[q]]
                there = (
                    f"{_ranks(callers)} called {have[callers[0]][step].describe()}"
                    if callers  # else the ring buffer has dropped it everywhere
                    else f"others went on to #{top}"
                )
                lines.append(
                    f"  rank {r} never reached collective #{step} (its last was #{last}); {there}"
                )
        common = sorted(set.intersection(*(set(s) for s in have.values())))
        for seq in common:
            signatures = Counter(have[r][seq].signature() for r in have)
            if len(signatures) == 1:
                continue
            problem = True
            lines.append(f"  first mismatch at collective #{seq}:")
            majority, count = signatures.most_common(1)[0]
            odd_ones = len(have) > 2 and count > len(have) / 2
            for r in sorted(have):
                entry = have[r][seq]
                mark = "  <- differs" if odd_ones and entry.signature() != majority else ""
                lines.append(f"    rank {r}: {entry.describe()}{mark}")
            break
        else:
            if not problem:
                lines.append(
                    f"  every rank called the same {len(common)} collective(s) up to #{top}: "
                    "no desync recorded (a hang here is outside the collectives: "
                    "see what each rank is doing, e.g. py-spy dump)"
                )
    return lines, problem


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("folder", type=Path, help="the folder of per-rank dumps")
    p.add_argument(
        "--prefix",
        default=None,
        help="file name before the rank number (default: the one prefix the folder's dumps share)",
    )
    args = p.parse_args(argv)
    lines, problem = compare(load_dir(args.folder, args.prefix))
    print("\n".join(lines))
    return 1 if problem else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
