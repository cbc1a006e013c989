"""``ossforge train CONFIG --nproc N | --hostfile F``: start the ranks through the DeepSpeed launcher.

The topology (world size against ``parallel.expert_parallel_size`` and the model's experts) is checked
here, before any rank starts. Each rank then runs ``python -m ossforge train CONFIG [--set ...]
[--resume]`` in-process, with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR set by the launcher.

- ``--nproc N``: N ranks on this machine (``deepspeed --num_gpus N``; on a CPU-only machine the ranks
  talk over gloo).
- ``--hostfile F``: DeepSpeed hostfile, one ``host slots=N`` line per node; the launcher reaches the
  other nodes over ssh (pdsh) and the first host is the master unless ``--master_addr`` says otherwise.
  With ``--nproc`` too, N ranks per node.
- ``OSSFORGE_LAUNCHER_ARGS``: extra launcher flags, e.g. ``"--master_addr 10.0.0.1 --master_port 29600"``
  or, without ssh, one command per node: ``"--no_ssh --node_rank 1 --master_addr 10.0.0.1"``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from ossforge.errors import UserError

_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def read_hostfile(path: str) -> dict[str, int]:
    """``{host: slots}`` from a DeepSpeed hostfile; UserError ``F:LINE: reason`` on a bad line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read hostfile: {exc.strerror or exc}") from None
    hosts: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.match(line)
        if not match:
            raise UserError(f"{path}:{number}: expected 'HOST slots=N', got {line!r}")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise UserError(f"{path}:{number}: host {host} listed twice")
        if slots < 1:
            raise UserError(f"{path}:{number}: slots must be >= 1")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"{path}: hostfile lists no hosts")
    return hosts


def world_size(args) -> tuple[int, str]:
    """(ranks over all nodes, the flag that decided it)."""
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"{args.config}: --nproc: must be >= 1, got {args.nproc}")
    if args.hostfile:
        hosts = read_hostfile(args.hostfile)
        if args.nproc:
            return args.nproc * len(hosts), "--hostfile x --nproc"
        return sum(hosts.values()), "--hostfile"
    return args.nproc, "--nproc"


def launcher_command(args, world: int) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--module"]
    if args.hostfile:
        cmd += ["--hostfile", str(Path(args.hostfile).resolve())]
        if args.nproc:
            cmd += ["--num_gpus", str(args.nproc)]
    else:
        cmd += ["--num_gpus", str(args.nproc), "--master_port", os.environ.get("MASTER_PORT", str(_free_port()))]
    cmd += shlex.split(os.environ.get("OSSFORGE_LAUNCHER_ARGS", ""))
    cmd += ["ossforge", "train", str(args.config)]
    for assignment in args.overrides:
        cmd += ["--set", assignment]
    if args.resume:
        cmd.append("--resume")
    return cmd


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, config) -> int:
    """Check the topology, then run the job's ranks under the DeepSpeed launcher; returns its exit code."""
    from ossforge.finetune.plan import check_topology

    world, flag = world_size(args)
    check_topology(config, world, args.config, flag)
    cmd = launcher_command(args, world)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"launching {world} rank(s): {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)
