"""Data-parallel training on torch.distributed: the only module that knows about process groups.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) ``Collective.from_env`` joins the
process group — NCCL on CUDA, gloo on CPU — and every rank trains a replica of the model on its
own share of the data. Without torchrun it is a world of one whose reductions are identities, so
the trainer has one code path.

The contract that keeps replicas identical: every rank's task loss is its *share* of the global
loss (the sum over its labelled rows divided by the labelled rows of all ranks), so the global
loss and gradient are plain sums over ranks. After the weighting's backward each rank's
``.grad`` holds its share and ``sum_gradients`` adds them up (one flat all-reduce), so every rank
applies the same update. Weighting methods see global loss values and, for gradient surgery,
global task gradients (see ``ranker.training.weighting.base``).

This is DDP's algorithm (replicas, summed gradients, identical updates) without the
``DistributedDataParallel`` wrapper, whose reducer fires inside ``backward``: gradient methods
take per-task gradients with ``autograd.grad`` and need them reduced *before* they combine them,
which the wrapper cannot do.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ranker.device import resolve_device
from ranker.errors import RankerError


class Collective:
    """Rank, world size and the reductions the trainer needs.

    Args:
        rank: this process's rank.
        world: number of processes.
        device: where this rank computes (collectives run on it for NCCL).

    Example:
        >>> c = Collective.single(torch.device("cpu"))
        >>> c.world, c.is_main, c.sum(torch.ones(2)).tolist()
        (1, True, [1.0, 1.0])
    """

    def __init__(self, rank: int, world: int, device: torch.device, local_rank: int = 0) -> None:
        self.rank, self.world, self.device, self.local_rank = rank, world, device, local_rank

    @classmethod
    def single(cls, device: torch.device) -> Collective:
        return cls(0, 1, device)

    @classmethod
    def from_env(cls, device_choice: str) -> Collective:
        """Join torchrun's process group when launched by it; a world of one otherwise.

        Raises:
            RankerError: CUDA asked for but absent, or the rendezvous fails.
        """
        device = resolve_device(device_choice, "train.device")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single(device)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
            except (RuntimeError, ValueError) as e:
                raise RankerError(f"torch.distributed: cannot join the process group ({e})") from None
        return cls(rank, world, device, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----- reductions -----------------------------------------------------------------------
    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over ranks, on ``x``'s device (a new tensor; ``x`` is left alone)."""
        return self._reduce(x, dist.ReduceOp.SUM)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, dist.ReduceOp.MAX)

    def _reduce(self, x: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        if self.world == 1:
            return x
        y = x.detach().to(self.device, copy=True)  # NCCL reduces device tensors only
        dist.all_reduce(y, op=op)
        return y.to(x.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def peer_lost(self, e: RuntimeError) -> bool:
        """Whether a collective failed because another rank went away (it stopped on its own
        error): torch's DistError, or gloo's and NCCL's plain RuntimeError about the connection."""
        if self.world <= 1:
            return False
        text = str(e)
        return isinstance(e, dist.DistError) or (
            ("gloo" in text or "NCCL" in text) and any(w in text for w in ("Connection", "connection", "peer", "closed")))

    def sum_gradients(self, params: Sequence[nn.Parameter], sparse: Sequence[nn.Parameter] = ()) -> None:
        """Add up every rank's gradient shares in place: one all-reduce over a flat buffer, and
        for the ``sparse`` parameters (row-sparse gradients) a gather of the rows each rank touched.

        A parameter without a gradient on every rank keeps ``grad = None`` (so the optimiser
        skips it exactly as in one process); one with a gradient on some rank gets zeros
        elsewhere before the sum.
        """
        if self.world == 1:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        has = self.max(has)
        live = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
        rows = [p for p in live if any(p is q for q in sparse)]
        if rows:
            self._sum_sparse(rows)
            live = [p for p in live if all(p is not q for q in rows)]
        if not live:
            return
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in live])  # type: ignore[union-attr]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        i = 0
        for p in live:
            n = p.numel()
            p.grad.copy_(flat[i : i + n].view_as(p))  # type: ignore[union-attr]
            i += n

    def _sum_sparse(self, params: Sequence[nn.Parameter]) -> None:
        """Sum row-sparse gradients (``train.sparse_embeddings``) in place (``sum_sparse``). A rank
        without a gradient for one of them sends no rows."""
        grads = [p.grad if p.grad is not None else torch.sparse_coo_tensor(  # no row on this rank
            torch.zeros((1, 0), dtype=torch.long, device=p.device), torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device), p.shape)
            for p in params]
        for p, g in zip(params, self.sum_sparse(grads), strict=True):
            p.grad = g

    def sum_sparse(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's row-sparse tensors (one sparse dimension) added up, coalesced: every rank
        gathers every rank's rows and values, padded to the longest, so the traffic is the rows
        present, not the tables."""
        grads = [g.coalesce() for g in tensors]
        if self.world == 1:
            return grads
        counts = torch.tensor([g._nnz() for g in grads], dtype=torch.long, device=self.device)
        every = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(every, counts)
        longest = torch.stack(every).max(0).values.tolist()
        out = []
        for j, (g, n) in enumerate(zip(grads, longest, strict=True)):
            idx = torch.zeros(n, dtype=torch.long, device=self.device)
            val = torch.zeros((n, *g.shape[1:]), dtype=g.dtype, device=self.device)
            idx[: g._nnz()] = g.indices()[0]
            val[: g._nnz()] = g.values()
            idxs = [torch.empty_like(idx) for _ in range(self.world)]
            vals = [torch.empty_like(val) for _ in range(self.world)]
            dist.all_gather(idxs, idx)
            dist.all_gather(vals, val)
            k = [int(c[j]) for c in every]  # this tensor's row count on each rank
            rows = torch.cat([i[:m] for i, m in zip(idxs, k, strict=True)])
            values = torch.cat([v[:m] for v, m in zip(vals, k, strict=True)])
            out.append(torch.sparse_coo_tensor(rows.unsqueeze(0), values, g.shape).coalesce().to(g.device))
        return out

    def check_same(self, what: str, value: Any) -> None:
        """Refuse to go on unless every rank holds the same ``value`` (e.g. the config)."""
        if self.world == 1:
            return
        blobs = self.gather_objects(pickle.dumps(value))
        for r, b in enumerate(blobs):
            if b != blobs[0]:
                raise RankerError(f"torch.distributed: rank {r} has a different {what} than rank 0")

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


