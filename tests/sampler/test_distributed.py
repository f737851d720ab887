"""Data parallelism over (digit, seed) jobs: two gloo processes under torchrun give exactly the
images one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tests._fixtures.flux  # noqa: F401  (one torch thread, as the launched ranks use)
from jit_sampler.config import JiTConfig
from jit_eval.distributed import generate_tiny
from jit_sampler.distributed import init_distributed, run_sharded, shard_indices
from jit_eval.tiny_flux import load_tiny_flux

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shard_indices_cover_every_job_once():
    for n in (0, 1, 7, 8):
        for world in (1, 2, 3):
            got = sorted(i for r in range(world) for i in shard_indices(n, r, world))
            assert got == list(range(n))
    assert shard_indices(8, 1, 2) == [1, 3, 5, 7]


@pytest.mark.parametrize("args", [(4, 2, 2), (4, -1, 2), (4, 0, 0), (-1, 0, 1)])
def test_shard_indices_bad(args):
    with pytest.raises(ValueError):
        shard_indices(*args)


def test_without_launcher_is_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == (0, 1)
    assert run_sharded(lambda j: j * 2, [1, 2, 3]) == [2, 4, 6]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    digits, seeds = [0, 3, 5, 8], [0, 1]
    out = tmp_path / "dp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "jit_eval.distributed", "--digits", *map(str, digits), "--seeds", *map(str, seeds),
           "--preset", "7x", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert [(j["digit"], j["seed"]) for j in manifest["jobs"]] == [(d, s) for d in digits for s in seeds]
    images = torch.load(out / "images.pt")
    model, cfg = load_tiny_flux(), JiTConfig.preset("7x")
    for k, (d, s) in enumerate((d, s) for d in digits for s in seeds):
        assert torch.equal(images[k], generate_tiny(model, d, s, cfg)), (d, s)
