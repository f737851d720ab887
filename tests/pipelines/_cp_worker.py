"""One rank of tests/pipelines/test_attention_processor.py::test_ulysses_two_gloo_ranks (run by torchrun).

The tiny FLUX.1 transformer of tests/_fixtures/flux.py under diffusers' Ulysses context parallelism on 2
gloo ranks (CPU). Writes ``rank<r>.json`` into the directory given as the first argument.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repo root

from tests._fixtures.flux import build_pipe  # noqa: E402  (sets one torch thread)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # diffusers places rank r on device r % torch.accelerator.device_count(), which is 0 on a CPU-only
    # machine; every rank runs on the CPU here.
    torch.accelerator.device_count = lambda: 1
    from diffusers import ContextParallelConfig

    from jit_sampler.pipelines.attention_processor import install_anchor_attention, remove_anchor_attention

    def fresh():
        return build_pipe().transformer  # deterministic weights (seeded)

    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
              pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
              guidance=torch.tensor([3.5]), img_ids=torch.randn(64, 3, generator=g), txt_ids=torch.zeros(6, 3),
              return_dict=False)
    res = {}
    with torch.no_grad():
        tr = fresh()
        ref = tr(**kw)[0]
        tr.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        res["stock_cp_diff"] = (tr(**kw)[0] - ref).abs().max().item()

        # Installed first, parallelism enabled after: refused when called.
        tr = fresh()
        install_anchor_attention(tr)
        tr.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        try:
            tr(**kw)
            res["call_error"] = ""
        except ValueError as exc:
            res["call_error"] = str(exc)
        remove_anchor_attention(tr)
        res["restored_diff"] = (tr(**kw)[0] - ref).abs().max().item()

        # Parallelism first: refused at installation, nothing swapped.
        before = dict(tr.attn_processors)
        try:
            install_anchor_attention(tr)
            res["install_error"] = ""
        except ValueError as exc:
            res["install_error"] = str(exc)
        res["install_swapped_nothing"] = all(tr.attn_processors[k] is v for k, v in before.items())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
