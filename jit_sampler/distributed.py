"""Many images across processes: data parallelism over (prompt, seed) jobs with ``torch.distributed``.

No parallel engine of our own: processes are started by ``torchrun`` (or ``accelerate launch``,
which sets the same ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` environment), the process group
is torch's (``gloo`` on CPU, ``nccl`` on GPUs), and results are exchanged with
``all_gather_object``. Rank ``r`` of ``W`` takes jobs ``r, r + W, r + 2W, ...``; every rank
returns the full list in job order.

Each job is generated alone (batch 1) from its own seeded generator, so a (prompt, seed)
pair gives the same image whatever the number of processes, bit for bit on CPU with the same
thread count (batching jobs together would couple them: a shared anchor set is chosen from
the batch-mean importance).

    torchrun --nproc_per_node 2 -m jit_eval.distributed --digits 0 1 2 3 --seeds 0 1 --out out/dp
    python -m jit_eval.distributed --digits 0 1 2 3 --seeds 0 1 --out out/sp   # same images

(the example on the embedded tiny model, in the evaluation bench).
With FLUX, wrap the pipeline call yourself::

    from jit_sampler.distributed import init_distributed, run_sharded
    rank, world = init_distributed()
    pipe = JiTFluxPipeline.from_pretrained(...).to(f"cuda:{rank % torch.cuda.device_count()}")
    jobs = [(p, s) for p in prompts for s in seeds]
    images = run_sharded(lambda job: pipe(job[0], generator=torch.Generator("cpu").manual_seed(job[1]),
                                          jit="4x").images[0], jobs)
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "shard_indices", "run_sharded"]


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by the launcher's environment; returns ``(rank, world_size)``.

    Without a launcher (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing is initialised and
    ``(0, 1)`` is returned. ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def shard_indices(num_jobs: int, rank: int, world_size: int) -> list[int]:
    """The job indices rank ``rank`` runs: ``rank, rank + world_size, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if num_jobs < 0:
        raise ValueError(f"num_jobs must be >= 0, got {num_jobs}")
    return list(range(rank, num_jobs, world_size))


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x


def run_sharded(fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list:
    """``[fn(job) for job in jobs]`` spread over the process group, gathered in job order on every rank.

    Outside a process group this is the plain list comprehension. Tensors in the results are
    moved to the CPU before gathering (``all_gather_object`` pickles them).
    """
    jobs = list(jobs)
    if not (dist.is_available() and dist.is_initialized()):
        return [fn(j) for j in jobs]
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [(i, _to_cpu(fn(jobs[i]))) for i in shard_indices(len(jobs), rank, world)]
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    out: list = [None] * len(jobs)
    for part in parts:
        for i, res in part:
            out[i] = res
    return out
