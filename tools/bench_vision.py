"""Vision towers eager against compiled (``compile_mm_encoder``), per image size.

Random weights in published tower shapes: Qwen2-VL / Qwen2.5-VL 7B (32 blocks, 1280 wide, 16
heads; Qwen2.5-VL with windows of 112 pixels and full attention in blocks 7, 15, 23 and 31),
compiled region by region around their per-image attention; InternVL2's InternViT-300M (24
blocks, 1024 wide, 448-pixel tiles, up to 12 tiles and a thumbnail) and LLaVA-1.5's CLIP
ViT-L/14-336 (the 23 blocks up to its feature layer), compiled block by block. InternViT sees a
square image of each side as its tiles; CLIP sees every image at 336 pixels. (Fuyu has no tower:
one linear layer projects its patches.) Per image size: the eager tower, then the compiled one:
the first call (which compiles) and the median of the timed calls. Image sizes alternate within
each round, so the compiled code sees two shapes (and turns dynamic) before timing, as an engine
serving mixed images would. Prints a table and writes it as JSON.

    python tools/bench_vision.py --device cuda --dtype bfloat16
    python tools/bench_vision.py --device cpu --dtype float32 --sides 336 448 --repeats 3 --depth 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fxllm.models.clip_vision import CLIPVisionTower  # noqa: E402
from fxllm.models.intern_vit import InternVisionModel, InternVisionSettings  # noqa: E402
from fxllm.models.layers import compile_layers  # noqa: E402
from fxllm.models.qwen2_vl_vision import Qwen2VisionTransformer, Qwen25VisionTransformer, compile_regions  # noqa: E402
from fxllm.runtime.multimodal.tiling import Tiling, num_tiles  # noqa: E402

PATCH = 14
TEMPORAL_PATCH = 2
CHANNELS = 3
WEIGHT_STD = 0.02
ARCHS = ("qwen2_vl", "qwen2_5_vl", "internvl", "llava")


# The 7B checkpoints' towers (the 2B/3B ones differ only in the merger's output width).
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=3584)
QWEN2_5_VL_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
# InternVL2-1B..8B's InternViT-300M-448px, and its default tiling.
INTERNVIT_300M = dict(
    hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, image_size=448, patch_size=PATCH,
    hidden_act="gelu", norm_type="layer_norm", norm_eps=1e-6, qkv_bias=True, qk_norm=False,
)
INTERNVL_TILING = Tiling(tile_size=448, min_tiles=1, max_tiles=12)
# LLaVA-1.5's CLIP ViT-L/14-336, read at its second-to-last block.
CLIP_VIT_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=CHANNELS,
)
LLAVA_FEATURE_LAYER = -2


def tower(arch: str, depth: int | None) -> torch.nn.Module:
    if arch == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

        shape = dict(QWEN2_VL_7B_VISION)
        if depth is not None:
            shape["depth"] = depth
        return Qwen2VisionTransformer(Qwen2VLVisionConfig(**shape))
    if arch == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

        shape = dict(QWEN2_5_VL_7B_VISION)
        if depth is not None:
            shape.update(depth=depth, fullatt_block_indexes=[depth - 1])
        return Qwen25VisionTransformer(Qwen2_5_VLVisionConfig(**shape))
    if arch == "internvl":
        shape = dict(INTERNVIT_300M)
        if depth is not None:
            shape["num_layers"] = depth
        return InternVisionModel(InternVisionSettings(**shape))
    from transformers import CLIPVisionConfig

    shape = dict(CLIP_VIT_L_336)
    if depth is not None:
        shape["num_hidden_layers"] = depth + 1  # the feature layer is the second-to-last
    return CLIPVisionTower(CLIPVisionConfig(**shape), [LLAVA_FEATURE_LAYER])


def compile_tower(arch: str, model: torch.nn.Module) -> None:
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        compile_regions(model.blocks)
    elif arch == "internvl":
        compile_layers(model.encoder.layers)
    else:
        compile_layers(model.vision_model.encoder.layers)


def image_inputs(arch: str, side: int, device: torch.device, dtype: torch.dtype) -> tuple[tuple, int]:
    """One square image of ``side`` pixels as the tower takes it, and its patch count."""
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        grid = side // PATCH
        pixels = torch.randn(grid * grid, CHANNELS * TEMPORAL_PATCH * PATCH * PATCH, device=device, dtype=dtype)
        return (pixels, [(1, grid, grid)]), grid * grid
    size = INTERNVL_TILING.tile_size if arch == "internvl" else CLIP_VIT_L_336["image_size"]
    images = num_tiles(side, side, INTERNVL_TILING) if arch == "internvl" else 1
    pixels = torch.randn(images, CHANNELS, size, size, device=device, dtype=dtype)
    return (pixels,), images * (size // PATCH) ** 2


def timed(model: torch.nn.Module, inputs: tuple, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model: torch.nn.Module, images: dict[int, tuple], repeats: int, device: torch.device) -> dict:
    """Per side: the first call's seconds and the median of ``repeats`` later calls (ms)."""
    first = {side: timed(model, inputs, device) for side, inputs in images.items()}
    # A second round before timing: compiled regions recompile once as dynamic here.
    for inputs in images.values():
        timed(model, inputs, device)
    times: dict[int, list[float]] = {side: [] for side in images}
    for _ in range(repeats):
        for side, inputs in images.items():
            times[side].append(timed(model, inputs, device))
    return {side: (first[side], statistics.median(times[side]) * 1000) for side in images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--device", default="cuda" if torch.cuda.device_count() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--sides", nargs="+", type=int, default=[448, 896], help="square image sides in pixels")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks than the published towers (quick checks)")
    parser.add_argument("--json", default="bench_vision.json", help="where to write the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = []
    for arch in args.archs:
        torch.manual_seed(0)
        model = tower(arch, args.depth).to(device=device, dtype=dtype).eval()
        for parameter in model.parameters():
            parameter.data.normal_(0, WEIGHT_STD)
        images = {side: image_inputs(arch, side, device, dtype) for side in args.sides}
        inputs = {side: images[side][0] for side in args.sides}
        with torch.inference_mode():
            eager = measure(model, inputs, args.repeats, device)
            compile_tower(arch, model)
            compiled = measure(model, inputs, args.repeats, device)
        for side in args.sides:
            rows.append((arch, side, images[side][1], eager[side][1], compiled[side][0], compiled[side][1]))
        del model
    print(f"\nvision tower, {device.type} {str(dtype).removeprefix('torch.')}, median of {args.repeats}")
    print(f"{'arch':<11} {'side':>5} {'patches':>8} {'eager ms':>9} {'compile s':>10} {'compiled ms':>12} {'speed-up':>9}")
    for arch, side, patches, eager_ms, first_s, compiled_ms in rows:
        print(f"{arch:<11} {side:>5} {patches:>8} {eager_ms:>9.1f} {first_s:>10.1f} {compiled_ms:>12.1f} {eager_ms / compiled_ms:>8.2f}x")
    fields = ("arch", "side", "patches", "eager_ms", "first_compiled_s", "compiled_ms")
    results = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "rows": [dict(zip(fields, row)) for row in rows]}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
