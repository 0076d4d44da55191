"""Distributed ZO on torch.distributed: data- or query-parallel, and only scalars cross the wire.

Launch ``zotune train`` with ``torchrun --nproc_per_node=N`` (gloo on CPU,
nccl on CUDA). Every process holds the whole model and applies the same
update, so parameters never need sending; what differs is who evaluates what:

* ``parallel: data`` -- every rank evaluates the same seeded perturbation on
  its contiguous slice of the step's batch; the losses are combined into the
  full batch's mean (weighted by slice size), so a step equals the one-process
  step up to float rounding of the mean.
* ``parallel: query`` -- with q queries per step, rank i evaluates queries
  i, i+N, ... on the full batch; the (query, g, loss) triples are all-gathered
  and every rank applies the update from all q. Directions are functions of
  :class:`~zotune.engine.QueryKey`, so no seed is ever sent, and the step is the
  one-process step bit for bit.

Scalars are exchanged with ``all_gather`` and summed in rank order on every
rank, so every rank computes the identical float. The payload is counted
(``comm_bytes`` in metrics.jsonl), and every ``check_sync_every`` steps a hash
of the trainable parameters is compared across ranks: a mismatch stops the run.
One process is a cluster of one whose hooks do nothing.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

from .engine import ZOEngine
from .errors import ZOError, require

PARALLEL_MODES = ("data", "query")


class Cluster:
    """This process's view of the run's processes: who it is, and the scalar exchanges."""

    def __init__(self, rank: int = 0, world: int = 1, parallel: str = "data", check_sync_every: int = 50,
                 device: str = "cpu"):
        self.rank, self.world, self.parallel = rank, world, parallel
        self.check_sync_every, self.device = check_sync_every, device
        self.comm_bytes = 0  # payload exchanged since the last step_stats()
        self.owns_group = False  # whether close() ends the process group (not when a caller set it up)
        self._weight = 1.0  # this rank's share of the step's batch (data-parallel)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory (metrics, trajectory, adapters) and shows progress."""
        return self.rank == 0

    # -- what each rank does --------------------------------------------------------------
    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous slice of the step's batch (data-parallel); the slices' union is the batch."""
        if self.world == 1 or self.parallel != "data":
            return list(indices)
        size, extra = divmod(len(indices), self.world)
        start = self.rank * size + min(self.rank, extra)
        mine = list(indices[start:start + size + (self.rank < extra)])
        self._weight = len(mine) / len(indices)
        return mine

    def wrap(self, engine: ZOEngine) -> ZOEngine:
        """Install the engine's hooks for this cluster's kind of parallelism (none on one process)."""
        if self.world == 1:
            return engine
        # The hooks live in ZOEngine.step; a method whose ranks would drift apart (AGZO's per-rank
        # activation bases, first-order backprop) declares itself not distributable.
        require(engine.method.distributable, f"distributed training: method {engine.method.name!r} cannot run "
                                             f"on several ranks exchanging scalars only")
        if self.parallel == "data":
            engine.reduce = self._mean_over_shards
        else:
            engine.local_queries = lambda: range(self.rank, engine.queries, self.world)
            engine.gather = lambda results: self._gather_queries(results, engine.queries)
        return engine

    # -- the exchanges ----------------------------------------------------------------------
    def _all_gather(self, values: list[float], dtype=torch.float64) -> list[list[float]]:
        """Every rank's ``values`` (equal lengths), in rank order; counts the gathered payload."""
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=dtype, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        self.comm_bytes += self.world * mine.numel() * mine.element_size()
        return [t.tolist() for t in out]

    def _mean_over_shards(self, local_mean: float) -> float:
        """The full batch's mean loss from each rank's shard mean, weighted by shard size."""
        return sum(v for (v,) in self._all_gather([local_mean * self._weight]))

    def _gather_queries(self, results: list[tuple[int, float, float]], queries: int) -> list[tuple[int, float, float]]:
        """Every rank's (query, g, loss) triples in query order; ranks with fewer queries pad with -1."""
        per_rank = -(-queries // self.world)
        flat = [x for r in results for x in r] + [-1.0, 0.0, 0.0] * (per_rank - len(results))
        triples = [tuple(row[i:i + 3]) for row in self._all_gather(flat) for i in range(0, len(row), 3)]
        out = sorted((int(q), g, loss) for q, g, loss in triples if q >= 0)
        require([q for q, _, _ in out] == list(range(queries)), f"query-parallel: ranks returned queries "
                                                                  f"{[q for q, _, _ in out]}, expected 0..{queries - 1}")
        return out

    def check_sync(self, step: int, params: dict[str, torch.Tensor], force: bool = False) -> None:
        """Every ``check_sync_every`` steps, prove the trainable parameters are bit-identical on every rank."""
        if self.world == 1 or not (force or (self.check_sync_every and step % self.check_sync_every == 0)):
            return
        digest = hashlib.blake2b(digest_size=8)
        for name in sorted(params):
            digest.update(name.encode())
            digest.update(params[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = int.from_bytes(digest.digest(), "little") >> 1  # fits int64
        sums = [int(v) for (v,) in self._all_gather([mine], dtype=torch.int64)]
        if len(set(sums)) > 1:
            raise ZOError(f"parameters differ across ranks after step {step} (checksums "
                          f"{', '.join(f'rank {r}: {s:016x}' for r, s in enumerate(sums))}); "
                          "the ranks saw different data or code")

    def step_stats(self) -> dict[str, Any]:
        """What the last step exchanged, for metrics.jsonl (nothing on one process)."""
        if self.world == 1:
            return {}
        stats = {"world_size": self.world, "parallel": self.parallel, "comm_bytes": self.comm_bytes}
        self.comm_bytes = 0
        return stats

    def describe(self) -> str:
        """One line for the log: who evaluates what, and what crosses the wire."""
        if self.world == 1:
            return "zotune: one process"
        if self.parallel == "data":
            return (f"zotune: data-parallel over {self.world} ranks: each evaluates every query on its slice of the "
                    f"batch; the exchange is one 8-byte loss per rank per forward pass")
        return (f"zotune: query-parallel over {self.world} ranks: rank r evaluates queries r, r+{self.world}, ... "
                f"on the whole batch; directions derive from (seed, step, query), so no seed is sent, only "
                f"(query, g, loss) scalars")

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and hand every rank its result (or its ZOError), e.g. the run directory."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except ZOError as exc:
                box[0] = ("error", str(exc))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise ZOError(value)
        return value

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.owns_group and dist.is_initialized():
                dist.destroy_process_group()


def import_before_group() -> None:
    """Import, before a process group exists, the torch modules a model load imports anyway.

    torch's FSDP modules (imported by ``transformers.modeling_utils``) take
    ``dist.group.WORLD`` as default arguments, evaluated at import. Imported after
    ``init_process_group``, they hold the default group for the life of the
    process: ``destroy_process_group`` cannot free it, gloo's threads keep
    running into interpreter exit, and there the process now and then aborts
    ("terminate called without an active exception") after a run that succeeded.
    Call this before ``init_process_group`` if you create the group yourself.
    """
    import torch.distributed.fsdp  # noqa: F401


def from_env(cfg) -> Cluster:
    """The cluster torchrun launched this process into (``WORLD_SIZE`` > 1), else a cluster of one.

    gloo on CPU, nccl on CUDA (each process on the GPU of its ``LOCAL_RANK``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Cluster()
    import torch.distributed as dist

    require(cfg.parallel in PARALLEL_MODES, f"parallel must be data or query, got {cfg.parallel!r}")
    rank = int(os.environ["RANK"])
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    require(not (cfg.parallel == "query" and cfg.difference == "forward"),
            "parallel query with difference forward would measure L(theta) on every rank; use data-parallel "
            "or central differences")
    if cfg.parallel == "data":
        require(cfg.batch_size >= world, f"parallel data splits each batch over {world} ranks: batch_size "
                                         f"must be >= {world}, got {cfg.batch_size}")
    cluster = Cluster(rank, world, cfg.parallel, cfg.check_sync_every, "cuda" if cuda else "cpu")
    if not dist.is_initialized():  # rank 0 may evaluate alone for a while: a long timeout
        import_before_group()
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
        cluster.owns_group = True
    return cluster
