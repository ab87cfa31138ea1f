"""Process layout from the torchrun-style environment the operator renders, and the local launcher.

A pod gets NNODES, NODE_RANK, NPROC_PER_NODE, WORLD_SIZE, MASTER_ADDR/PORT. With one process
per pod, RANK is the pod's index and leap-train runs directly. With NPROC_PER_NODE > 1 and no
LOCAL_RANK, leap-train is the launcher: it starts NPROC_PER_NODE copies of itself with
LOCAL_RANK and RANK set, waits, and fails fast when any of them fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from . import contract as c


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"leap-train: environment variable {name}={raw!r} is not an integer; "
                         f"set it to a whole number or unset it") from None


@dataclass(frozen=True)
class Layout:
    rank: int          # global rank
    local_rank: int    # rank within this pod/machine: picks the GPU and the metrics port offset
    world_size: int
    node_rank: int
    nproc_per_node: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def layout_from_env(env: Mapping[str, str] = os.environ) -> Layout:
    layout = Layout(
        rank=env_int(env, c.ENV_RANK, 0),
        local_rank=env_int(env, c.ENV_LOCAL_RANK, 0),
        world_size=env_int(env, c.ENV_WORLD_SIZE, 1),
        node_rank=env_int(env, c.ENV_NODE_RANK, 0),
        nproc_per_node=env_int(env, c.ENV_NPROC_PER_NODE, 1),
    )
    if not 0 <= layout.rank < max(layout.world_size, 1):
        raise SystemExit(f"leap-train: RANK={layout.rank} is outside WORLD_SIZE={layout.world_size}; "
                         f"RANK must be 0..WORLD_SIZE-1")
    return layout


def needs_local_launch(env: Mapping[str, str] = os.environ) -> bool:
    return env_int(env, c.ENV_NPROC_PER_NODE, 1) > 1 and c.ENV_LOCAL_RANK not in env


def child_envs(env: Mapping[str, str]) -> list[dict[str, str]]:
    """The environment of each local process (RANK = NODE_RANK * NPROC + LOCAL_RANK)."""
    nproc = env_int(env, c.ENV_NPROC_PER_NODE, 1)
    nnodes = env_int(env, c.ENV_NNODES, 1)
    node_rank = env_int(env, c.ENV_NODE_RANK, 0)
    world = env_int(env, c.ENV_WORLD_SIZE, nnodes * nproc)
    if world != nnodes * nproc:
        raise SystemExit(f"leap-train: WORLD_SIZE={world} but NNODES x NPROC_PER_NODE = {nnodes} x {nproc}; "
                         f"set WORLD_SIZE to {nnodes * nproc} or unset it")
    base = dict(env)
    base.setdefault(c.ENV_MASTER_ADDR, "127.0.0.1")
    base.setdefault(c.ENV_MASTER_PORT, str(c.DEFAULT_MASTER_PORT))
    out = []
    for local_rank in range(nproc):
        child = dict(base)
        child.update({c.ENV_LOCAL_RANK: str(local_rank), c.ENV_RANK: str(node_rank * nproc + local_rank),
                      c.ENV_WORLD_SIZE: str(world), c.ENV_NODE_RANK: str(node_rank)})
        out.append(child)
    return out


def _die_with_parent() -> None:
    # Linux: a child gets SIGKILL when the launcher dies, so a killed pod leaves no orphans.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: nothing to do
        pass


def launch_local(argv: list[str], env: Mapping[str, str] = os.environ) -> int:
    """Run NPROC_PER_NODE copies of leap-train; the first failure stops the rest."""
    command = [sys.executable, "-m", "leap_trainer.cli", *argv]
    children = [subprocess.Popen(command, env=child_env, preexec_fn=_die_with_parent)
                for child_env in child_envs(env)]

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                print(f"leap-train: a local process exited with {failed[0]}; stopping the others",
                      file=sys.stderr, flush=True)
                _stop(children)
                return failed[0] if failed[0] > 0 else 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: list[subprocess.Popen], grace: float = 5.0) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def init_process_group(layout: Layout, device_type: str) -> None:
    import datetime

    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=layout.rank,
                            world_size=layout.world_size, timeout=datetime.timedelta(minutes=10))


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
