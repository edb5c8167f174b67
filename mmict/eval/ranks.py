"""Evaluation over several processes (GPUs, nodes, or CPU processes on gloo) with the numbers of one process.

Processes are started by Lightning, as for training: `launch` builds a `lightning.fabric.Fabric` from the run's
`trainer.accelerator` / `trainer.devices` / `trainer.num_nodes`, whose launcher and cluster environment are the
ones the Trainer uses (`srun` under SLURM: SLURMEnvironment; `torchrun`: TorchElasticEnvironment; `devices=N`
on one machine: the subprocess script launcher, CPU included with gloo). After `mmict train`, evaluation runs in
the processes the Trainer started: `Ranks.current()` finds their process group.

Why the numbers cannot depend on the number of processes (`mmict.eval.loop.evaluate`):
- every rank draws every trial's queries and demos (cheap, seeded per trial, never per rank);
- a trial's queries are cut into the batches one process would run, and whole batches are dealt to the ranks
  (batch b to rank b mod N): every batch has the same queries, padding and shapes as with one process, so each
  answer is computed by exactly the same operations;
- the per-batch answers are gathered in batch order and scored once, on rank 0; its results are broadcast, so
  every rank returns the same `TrialResult`s and only rank 0 writes files.
OpenFlamingo shards its query subset with a DistributedSampler (open_flamingo/eval/utils.py, prepare_eval_samples,
lines 49-62), which shuffles and pads the last ranks' shards with repeated queries, and gathers predictions with
all_gather_object (open_flamingo/eval/evaluate.py line 863); its demos are drawn per batch from each rank's own RNG,
so its numbers change with the number of GPUs (as lmms-eval users report, lmms-eval #750). Dealing whole batches
of pre-drawn trials repeats nothing and changes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the evaluation's processes, and the collectives evaluation needs."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def current(cls, device: torch.device | None = None) -> Ranks:
        """The initialised process group's rank and size (one process when there is none)."""
        device = device if device is not None else torch.device("cpu")
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(0, 1, device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, n_batches: int) -> list[int]:
        """The batches this rank runs: batch b goes to rank b mod N."""
        return list(range(self.rank, n_batches, self.world))

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_first(self, work: Callable[[], T]) -> T:
        """`work` on rank 0, then on the other ranks (which find what rank 0 wrote: the demonstration bank, the
        feature caches, the toy world), so that shared files are built once and never by two ranks at a time."""
        if self.main:
            out = work()
            self.barrier()
            return out
        self.barrier()
        return work()


def launch(accelerator: str, devices: int | str, num_nodes: int = 1) -> Ranks:
    """Start (or join) the evaluation's processes with Lightning Fabric's launcher for this environment, and this
    process's `Ranks` (its device is the one Fabric gives it). One device on one node starts nothing."""
    from lightning.fabric import Fabric

    multi = num_nodes > 1 or (isinstance(devices, int) and devices > 1) or devices in (-1, "-1")
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy="ddp" if multi else "auto")
    fabric.launch()
    ranks = Ranks(fabric.global_rank, fabric.world_size, fabric.device)
    if ranks.world > 1 and ranks.main:
        log.info("evaluating with %d processes (%s): batches dealt to ranks, answers gathered and scored on rank 0",
                 ranks.world, fabric.device.type)
    return ranks


# What a launcher or a cluster tells a process about its rank and its peers
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_launch_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a command whose ranks Lightning starts on this machine: every SLURM and
    rank setting removed (an salloc shell's SLURM_* would make Lightning wait for srun's ranks; a test's leftover
    MASTER_ADDR would name another host), a local address and a free port."""
    env = dict(os.environ if env is None else env)
    out = {k: v for k, v in env.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    return {**out, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
