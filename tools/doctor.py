"""Preflight check of a job's network, before the real job: can every rank reach every other?

    torchrun --standalone --nproc-per-node 2 -m tools.doctor
    GLOO_SOCKET_IFNAME=eth9 torchrun --standalone --nproc-per-node 2 -m tools.doctor
    torchrun --standalone --nproc-per-node gpu -m tools.doctor --backend nccl

Run it with the same launcher, nodes and environment as the job. Each rank first prints, before
it joins the process group, where it runs and what it will use:

* its host, global and local rank;
* the address gloo will bind, and on which interface: the interfaces named by
  `GLOO_SOCKET_IFNAME` (comma-separated), or else the address this host's name resolves to
  (gloo's default; a name that resolves to nothing falls back to the loopback address);
* `MASTER_ADDR:MASTER_PORT` (the rendezvous store torchrun set up), what the name resolves to,
  and the local interface and address the kernel routes it through.

Then, with a process group whose timeout is `--timeout` (default 10 s, not torch's ten
minutes) on `--backend` (default: nccl where CUDA GPUs are, one per local rank, else gloo): a
barrier; an all-reduce checksum (rank r contributes r + 1 in every element, so every element
of the sum is exactly W(W+1)/2); a send/recv ring (each rank sends to the next and receives
from the previous, and checks whom it got); each with its time, read after the GPU has
finished (NCCL calls return once their kernels are queued). With NCCL the same checks run
once more in a gloo group on the CPU: the training script agrees on preemption over one
(training/preempt.py), and gloo needs its own reachable address (GLOO_SOCKET_IFNAME). Global
rank 0 prints the results of every rank and `doctor: ok` at the end.

What goes wrong ends with one `error:` line per node that names the cause, exit status 1:
an interface `GLOO_SOCKET_IFNAME` names but this host does not have (or that has no address),
a loopback address in a job that spans several nodes (peers elsewhere cannot reach it), a
`MASTER_ADDR` that does not resolve, a rendezvous store nobody answers at (when the ranks are
started by hand with `MASTER_ADDR`/`MASTER_PORT`; torchrun's own agent does its rendezvous
before any rank starts, and reports that itself), peers that cannot be reached within the
timeout, or a wrong checksum.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from core.cli import Parser
from core.dist import BACKENDS, default_backend
from core.errors import run_cli, say

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
CPU = torch.device("cpu")


class DoctorError(Exception):
    """A cause found: printed as one `error:` line, exit status 1."""


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.description = __doc__  # the whole docstring: its examples are the help
    p.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        help="seconds the rendezvous and each collective may take (default 10)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="backend of the checks (default: nccl where CUDA GPUs are, else gloo)",
    )
    p.add_argument(
        "--mib",
        type=_positive,
        default=4.0,
        help="size of the all-reduce and ring tensors in MiB (default 4)",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------- where this rank is


def interfaces() -> dict[str, list[str]]:
    """Every network interface of this host and its addresses (IPv4 by ioctl, IPv6 from
    /proc; Linux. Elsewhere the names only)."""
    found: dict[str, list[str]] = {name: [] for _, name in socket.if_nameindex()}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in found:
            try:
                packed = fcntl.ioctl(
                    s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode())
                )
                found[name].append(socket.inet_ntoa(packed[20:24]))
            except OSError:
                pass  # no IPv4 address (down, or IPv6 only)
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr, *_, name = line.split()
                if name in found:
                    raw = bytes.fromhex(hexaddr)
                    found[name].append(socket.inet_ntop(socket.AF_INET6, raw))
    except OSError:
        pass
    return found


def _owner(address: str, table: dict[str, list[str]]) -> str:
    return next((name for name, addrs in table.items() if address in addrs), "?")


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


@dataclass
class Place:
    host: str
    bind: list[tuple[str, str]]  # (interface, address) gloo will use
    how: str
    master: str
    master_ip: str
    route: tuple[str, str]  # (interface, local address) towards MASTER_ADDR

    def line(self, rank: int, world: int, local_rank: int) -> str:
        bind = ", ".join(f"{i} {a}" for i, a in self.bind)
        return (
            f"rank {rank}/{world} (local {local_rank}) on {self.host}: gloo binds {bind} "
            f"({self.how}); MASTER_ADDR {self.master} is {self.master_ip}, "
            f"reached through {self.route[0]} {self.route[1]}"
        )


def locate(spans_nodes: bool) -> Place:
    """What this rank will use, checked before it joins anything (DoctorError if it cannot
    work)."""
    host = socket.gethostname()
    table = interfaces()
    wanted = os.environ.get("GLOO_SOCKET_IFNAME", "")
    if wanted:
        bind = []
        for name in (n.strip() for n in wanted.split(",")):
            if name not in table:
                have = ", ".join(table) or "none"
                raise DoctorError(
                    f"GLOO_SOCKET_IFNAME={wanted}: this host ({host}) has no interface {name!r} "
                    f"(it has: {have})"
                )
            if not table[name] and sys.platform.startswith("linux"):  # addresses: Linux only
                raise DoctorError(
                    f"GLOO_SOCKET_IFNAME={wanted}: interface {name} on {host} has no address "
                    "(is it down?)"
                )
            bind.append((name, table[name][0] if table[name] else "?"))
        how = "GLOO_SOCKET_IFNAME"
    else:
        try:
            address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
            how = f"GLOO_SOCKET_IFNAME unset: the address of hostname {host}"
        except OSError:
            address = "127.0.0.1"
            how = f"GLOO_SOCKET_IFNAME unset and hostname {host} does not resolve: loopback"
        bind = [(_owner(address, table), address)]
    if spans_nodes and any(_is_loopback(a) for _, a in bind):
        raise DoctorError(
            f"gloo would bind {bind[0][1]} ({how}) on {host}, but the job spans several nodes: "
            "ranks on other nodes cannot reach a loopback address; set GLOO_SOCKET_IFNAME to "
            "the interface that reaches MASTER_ADDR"
        )
    master = os.environ.get("MASTER_ADDR", "")
    port = int(os.environ.get("MASTER_PORT", "0") or 0)
    if not master:
        raise DoctorError("MASTER_ADDR is not set: run the doctor under torchrun")
    try:
        master_ip = socket.getaddrinfo(master, port, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        raise DoctorError(f"MASTER_ADDR={master} does not resolve on {host}: {e}") from None
    route = ("?", "?")
    family = socket.AF_INET6 if ":" in master_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:  # connect() on UDP sends nothing
        try:
            s.connect((master_ip, port or 9))
            local = s.getsockname()[0]
            route = (_owner(local, table), local)
        except OSError as e:
            raise DoctorError(
                f"no route from {host} to MASTER_ADDR={master} ({master_ip}): {e}"
            ) from None
    return Place(host, bind, how, f"{master}:{port}", master_ip, route)


# ------------------------------------------------------------------------- the checks


def _join(timeout: float, place: Place, backend: str, device: torch.device) -> None:
    """init_process_group, its failures turned into a cause."""
    try:
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=timeout),
            device_id=device if device.type == "cuda" else None,
        )
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unable to find address for" in text:
            raise DoctorError(
                f"gloo cannot bind the interface in GLOO_SOCKET_IFNAME: {text}"
            ) from None
        # The store's client raises DistNetworkError / DistStoreError; gloo's own connections
        # between the ranks raise RuntimeError.
        if isinstance(e, dist.DistNetworkError | dist.DistStoreError) or "TCPStore" in text:
            raise DoctorError(
                f"rendezvous: no store answered at MASTER_ADDR:MASTER_PORT={place.master} "
                f"({place.master_ip}) within {timeout:g} s: is rank 0's node up, the address "
                f"and port right, the port open? ({text})"
            ) from None
        raise DoctorError(
            f"could not connect to the other ranks within {timeout:g} s: an address one rank "
            f"binds is not reachable from another (GLOO_SOCKET_IFNAME?) ({text})"
        ) from None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    """Seconds from the call to the end of its work: on a GPU a call returns once its
    kernels are queued, so the GPU is waited for before each reading of the clock."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def checks(
    rank: int,
    world: int,
    mib: float,
    device: torch.device = CPU,
    group: dist.ProcessGroup | None = None,
) -> dict:
    """Barrier, all-reduce checksum, send/recv ring on this rank (global ranks, `group` of
    every rank): times and verdicts."""
    numel = max(1, int(mib * 2**20 / 4))
    out: dict = {"barrier_s": _timed(lambda: dist.barrier(group), device)}
    x = torch.full((numel,), float(rank + 1), device=device)
    out["all_reduce_s"] = _timed(lambda: dist.all_reduce(x, group=group), device)
    expected = world * (world + 1) / 2  # small integers: exact in float32
    out["checksum_ok"] = bool((x == expected).all())
    out["checksum"] = x[0].item()
    right, left = (rank + 1) % world, (rank - 1) % world
    send = torch.full((numel,), float(rank), device=device)
    recv = torch.empty(numel, device=device)

    def ring() -> None:
        ops = [
            dist.P2POp(dist.isend, send, right, group),
            dist.P2POp(dist.irecv, recv, left, group),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    out["ring_s"] = _timed(ring, device)
    out["ring_ok"] = bool((recv == float(left)).all())
    return out


def run(args: argparse.Namespace) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    torch.set_num_threads(1)
    backend = args.backend or default_backend()
    device = CPU
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DoctorError(
                f"--backend nccl: local rank {local_rank} has no GPU of its own "
                f"({torch.cuda.device_count()} visible); start one rank per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    place = locate(spans_nodes=world > local_world)
    print(place.line(rank, world, local_rank), flush=True)
    _join(args.timeout, place, backend, device)
    mine = {}
    try:
        mine[backend] = checks(rank, world, args.mib, device)
        if backend != "gloo":  # the side group the training script makes (training/preempt.py)
            gloo = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.timeout))
            mine["gloo"] = checks(rank, world, args.mib, group=gloo)
    except RuntimeError as e:
        raise DoctorError(
            f"a collective failed after the group was formed ({str(e).strip().splitlines()[0]})"
        ) from None
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {"host": place.host, **mine})
    dist.destroy_process_group()
    if rank != 0:
        return
    mb = args.mib * 2**20 / 1e6
    bad = set()
    for name in mine:
        label = f", {name}" if len(mine) > 1 else ""  # NCCL, then its gloo side group
        for r, everything in enumerate(everyone):
            v = everything[name]
            print(
                f"rank {r} on {everything['host']}{label}: barrier {v['barrier_s'] * 1e3:.1f} "
                f"ms, all-reduce {mb:.1f} MB {v['all_reduce_s'] * 1e3:.1f} ms "
                f"(sum {v['checksum']:g}, {'ok' if v['checksum_ok'] else 'WRONG'}), ring "
                f"send/recv {v['ring_s'] * 1e3:.1f} ms ({'ok' if v['ring_ok'] else 'WRONG'})"
            )
            if not (v["checksum_ok"] and v["ring_ok"]):
                bad.add(r)
    if bad:
        raise DoctorError(
            f"wrong results on rank(s) {','.join(map(str, sorted(bad)))}: every element of the sum "
            f"should be {world * (world + 1) / 2:g}, and each rank should receive its left "
            "neighbour's rank"
        )
    hosts = len({v["host"] for v in everyone})
    print(
        f"doctor: ok ({world} rank(s) on {hosts} host(s), "
        + (f"{' and '.join(mine)}, " if len(mine) > 1 else "")
        + f"checksum {world * (world + 1) // 2})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except DoctorError as e:
        # The causes found before the group forms are the same for every rank of a node
        # (same host, same environment): its first local rank says it, once.
        if os.environ.get("LOCAL_RANK", "0") == "0" or dist.is_initialized():
            line = f"error: rank {os.environ.get('RANK', '0')} ({socket.gethostname()}): {e}"
            say(line)  # also torchrun's error file: its report shows it as the root cause
        if dist.is_initialized():
            os._exit(1)  # peers may sit in a collective: leave without tearing the group down
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
