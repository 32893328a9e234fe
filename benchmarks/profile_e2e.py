"""Where one decoding step of the 8B-shaped model with the kvpack int8 cache spends its GPU time.

Runs the end-to-end model of ``kvpack bench-attention --e2e`` (32768 cached tokens) at batch 1 and 8,
with the decode kernel's default launch parameters and with the 16-row, 2-warp, 64-token program of
earlier defaults, and prints the step's GPU time and its ten most expensive kernels under the profiler.

    python benchmarks/profile_e2e.py
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import kvpack.hf_attention  # noqa: F401  (registers attn_implementation="kvpack")
from kvpack.bench import attention as bench
from kvpack.triton import attention as kernel

CONTEXT = 32768


def main() -> None:
    device = torch.device("cuda")
    model = bench.llama3_8b_shaped(device)
    model.set_attn_implementation("kvpack")
    default = kernel.default_config
    earlier = kernel.KernelConfig(block_n=64, num_warps=2, block_m=16)
    for batch in (1, 8):
        cache = bench._fill_kvpack(model, batch, CONTEXT, 0, "fused", 64)
        for name, choose in (("default", default), ("earlier", lambda *a, **k: earlier)):
            kernel.default_config = choose
            gpu_ms, wall_ms = bench._step_ms(model, cache, batch, repeats=5)
            ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
            with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
            print(f"== batch {batch}, {name} launch parameters: step {gpu_ms:.2f} ms GPU, "
                  f"{wall_ms:.2f} ms wall")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10,
                                            max_name_column_width=60))
        kernel.default_config = default
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
