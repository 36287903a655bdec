"""Launch settings of the split-decode attention kernel, swept on a mix of context lengths.

One layer's decode call (every request one query token over a paged cache of scattered
blocks), with the contexts drawn uniformly from a range as a long offline run has them
(workload T's decodes see 100 to about 2,000 tokens), for every combination of keys per
tile, warps, pipeline stages and target programs per SM. Each setting's output is
checked against the default setting's; on CUDA each is timed (median of
``triton.testing.do_bench``) and its K/V read rate given in TB/s. The defaults are the
constants of ``fxllm.attention.triton_kernels``; the sweep sets them one setting
at a time and puts them back.

    python tools/bench_decode_settings.py                     # GPU: Qwen3-0.6B attention, batch 256 and 96
    python tools/bench_decode_settings.py --device cpu --batch-sizes 3 --contexts 8 80 \\
        --tile-keys 32 64 --warps 4 --stages 2 --programs-per-sm 8   # CPU smoke run (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

SEED = 0
BLOCK_SIZE = 16
TOP_SETTINGS = 5  # the fastest settings listed per batch size
# The kernel module's constants a setting changes (and the sweep puts back).
SETTING_CONSTANTS = ("DECODE_TILE_KEYS", "TILE_BYTES", "DECODE_NUM_WARPS", "DECODE_NUM_STAGES", "DECODE_PROGRAMS_PER_SM")


@dataclass(frozen=True)
class Setting:
    tile_keys: int
    warps: int
    stages: int
    programs_per_sm: int


def _constants(kernels, setting: Setting, head_dim: int, element_size: int) -> dict[str, int]:
    """SETTING_CONSTANTS' values for ``setting`` (a tile of ``tile_keys`` keys must fit TILE_BYTES)."""
    return {
        "DECODE_TILE_KEYS": setting.tile_keys,
        "TILE_BYTES": max(kernels.TILE_BYTES, setting.tile_keys * kernels.padded_head_dim(head_dim) * element_size),
        "DECODE_NUM_WARPS": setting.warps,
        "DECODE_NUM_STAGES": setting.stages,
        "DECODE_PROGRAMS_PER_SM": setting.programs_per_sm,
    }


class DecodeCase:
    """One layer's decode step: queries, a paged cache holding every context, and the metadata."""

    def __init__(self, args: argparse.Namespace, batch: int, device: torch.device):
        rng = random.Random(SEED)
        low, high = args.contexts
        self.lengths = [rng.randint(low, high) for _ in range(batch)]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.max_blocks = -(-high // BLOCK_SIZE)
        num_blocks = batch * self.max_blocks
        generator = torch.Generator(device=device).manual_seed(SEED)
        cache_shape = (2, num_blocks, BLOCK_SIZE, args.num_kv_heads, args.head_dim)
        self.kv_cache = torch.randn(cache_shape, generator=generator, device=device, dtype=dtype)
        # Scattered blocks, as a long run hands them out.
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(SEED))
        self.block_tables = order.view(batch, self.max_blocks).to(torch.int32).to(device)
        self.seq_lens = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.query = torch.randn(batch, args.num_heads, args.head_dim, generator=generator, device=device, dtype=dtype)
        self.scale = args.head_dim**-0.5
        self.kv_bytes = sum(self.lengths) * args.num_kv_heads * args.head_dim * 2 * self.kv_cache.element_size()

    def runner(self, kernels):
        """A call of the split kernel with scratch sized for the module's current constants."""
        batch, heads, head_dim = self.query.shape
        num_kv_heads = self.kv_cache.shape[3]
        splits = kernels.decode_num_splits(batch, num_kv_heads, self.max_blocks, BLOCK_SIZE, self.query.device)
        scratch = kernels.empty_decode_scratch(batch, heads, head_dim, splits, self.query.device)
        out = torch.empty_like(self.query)

        def run() -> torch.Tensor:
            kernels.split_decode_attention(
                self.query, self.kv_cache[0], self.kv_cache[1], out, self.block_tables, self.seq_lens,
                self.query_start_loc, self.scale, None, *scratch,
            )
            return out

        return run, splits


def sweep(args: argparse.Namespace, batch: int, device: torch.device) -> list[dict]:
    from fxllm.attention import triton_kernels as kernels

    case = DecodeCase(args, batch, device)
    default_run, _ = case.runner(kernels)
    reference = default_run().float().clone()
    saved = {name: getattr(kernels, name) for name in SETTING_CONSTANTS}
    default = Setting(saved["DECODE_TILE_KEYS"], saved["DECODE_NUM_WARPS"], saved["DECODE_NUM_STAGES"],
                      saved["DECODE_PROGRAMS_PER_SM"])
    rows = []
    try:
        for values in itertools.product(args.tile_keys, args.warps, args.stages, args.programs_per_sm):
            setting = Setting(*values)
            for name, value in _constants(kernels, setting, args.head_dim, case.kv_cache.element_size()).items():
                setattr(kernels, name, value)
            run, splits = case.runner(kernels)
            error = (run().float() - reference).abs().max().item()
            microseconds = None
            if device.type == "cuda":
                import triton.testing

                microseconds = triton.testing.do_bench(run, return_mode="median") * 1e3
            rows.append({
                "batch": batch, **setting.__dict__, "splits": splits, "default": setting == default,
                "us": round(microseconds, 1) if microseconds else None,
                "kv_tb_per_s": round(case.kv_bytes / (microseconds * 1e-6) / 1e12, 3) if microseconds else None,
                "max_abs_error": error,
            })
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'batch':>5} {'keys':>5} {'warps':>5} {'stages':>6} {'per SM':>6} {'splits':>6} {'us':>9} {'KV TB/s':>8}  ")
    for row in rows:
        mark = "  (default)" if row["default"] else ""
        timing = f"{row['us']:>9} {row['kv_tb_per_s']:>8}" if row["us"] is not None else f"{'-':>9} {'-':>8}"
        print(f"{row['batch']:>5} {row['tile_keys']:>5} {row['warps']:>5} {row['stages']:>6} {row['programs_per_sm']:>6} "
              f"{row['splits']:>6} {timing}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 96])
    parser.add_argument("--contexts", type=int, nargs=2, default=[100, 2048], metavar=("MIN", "MAX"),
                        help="each request's context, uniform in [MIN, MAX]")
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tile-keys", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--json", default="bench_decode_settings.json", help="where to write the results")
    args = parser.parse_args()
    low, high = args.contexts
    if not 1 <= low <= high:
        parser.error(f"--contexts needs 1 <= MIN <= MAX, got {low} {high}")
    device = torch.device(args.device)
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
    rows = []
    for batch in args.batch_sizes:
        found = sweep(args, batch, device)
        rows += found
        timed = sorted((row for row in found if row["us"] is not None), key=lambda row: row["us"])
        print_rows([row for row in found if row["default"]] + timed[:TOP_SETTINGS] if timed else found)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
