"""Convert a full-precision HF checkpoint directory into a pre-quantized FP8 checkpoint.

    python tools/write_fp8_checkpoint.py SRC DST --format fp8                      # transformers, 128x128 blocks
    python tools/write_fp8_checkpoint.py SRC DST --format compressed-tensors --strategy channel
    python tools/write_fp8_checkpoint.py SRC DST --format compressed-tensors --strategy tensor --activations static

Writes the layouts the published tools write, so fxllm's loader can be tested without
downloading FP8 checkpoints:
- ``fp8`` (transformers' FineGrainedFP8, DeepSeek-V3 / Qwen3-FP8 style): config.json
  ``quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt":
  "e4m3", "weight_block_size": [bn, bk]}``; each quantized ``X.weight`` float8_e4m3fn and
  ``X.weight_scale_inv`` float32 [ceil(out/bn), ceil(in/bk)] (edge blocks partial), where
  ``real = fp8 * weight_scale_inv``.
- ``compressed-tensors`` (llm-compressor's FP8 schemes, format "float-quantized"): one
  config group targeting "Linear" with 8-bit float weights (strategy "tensor" or
  "channel"), input activations dynamic per token, static per tensor or none, and
  ``ignore: ["lm_head"]``; each ``X.weight`` float8_e4m3fn, ``X.weight_scale`` [1] or
  [out, 1] and, for static activations, ``X.input_scale`` [1], scales in the model's
  dtype. Static input scales are calibrated on ``--calibration-text`` prompts: the
  largest absolute input each layer sees, divided by 448.

Quantized layers are the ``nn.Linear`` modules of the transformers model except
``lm_head`` (what both tools select by default). Everything else is copied unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fxllm.models.quantization.fp8_quant import (
    FP8_MAX,
    MIN_SCALE,
    quantize_per_block,
    quantize_per_channel,
    quantize_per_tensor,
)
from fxllm.models.weights import SAFETENSORS_INDEX, safetensors_files

FORMATS = ("fp8", "compressed-tensors")
STRATEGIES = ("tensor", "channel")
ACTIVATIONS = ("dynamic", "static", "none")
DEFAULT_BLOCK = (128, 128)
UNQUANTIZED = ("lm_head",)
DEFAULT_CALIBRATION = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a tiny model that learned to count: one two three four five.",
    "Compilers turn graphs into fast kernels; attention reads the paged cache.",
)


def write_fp8_checkpoint(
    source: Path,
    target: Path,
    fmt: str,
    strategy: str = "channel",
    activations: str = "dynamic",
    block: tuple[int, int] = DEFAULT_BLOCK,
    calibration: tuple[str, ...] = DEFAULT_CALIBRATION,
) -> Path:
    """Write ``source`` quantized as ``fmt`` into ``target``; return ``target``."""
    source, target = Path(source), Path(target)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if strategy not in STRATEGIES or activations not in ACTIVATIONS:
        raise ValueError(f"strategy must be one of {STRATEGIES} and activations one of {ACTIVATIONS}")
    if fmt == "fp8" and activations != "dynamic":
        raise ValueError("transformers' block-wise FP8 format has dynamic activations only")
    linears = linear_modules(source)
    input_scales = calibrate_input_scales(source, linears, calibration) if activations == "static" else {}
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.name not in ("config.json", SAFETENSORS_INDEX) and item.is_file():
            shutil.copy2(item, target / item.name)
    weight_map = {}
    for file in safetensors_files(source):
        tensors = {}
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                module = name.removesuffix(".weight")
                if not name.endswith(".weight") or module not in linears:
                    tensors[name] = tensor
                elif fmt == "fp8":
                    tensors[name], scale = quantize_per_block(tensor, *block)
                    tensors[f"{module}.weight_scale_inv"] = scale
                else:
                    quantize = quantize_per_tensor if strategy == "tensor" else quantize_per_channel
                    tensors[name], scale = quantize(tensor)
                    tensors[f"{module}.weight_scale"] = scale.to(tensor.dtype)
                    if module in input_scales:
                        tensors[f"{module}.input_scale"] = input_scales[module].to(tensor.dtype)
        save_file(tensors, str(target / file.name), metadata={"format": "pt"})
        weight_map.update({name: file.name for name in tensors})
    if (source / SAFETENSORS_INDEX).exists():
        (target / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = json.loads((source / "config.json").read_text())
    if fmt == "fp8":
        config["quantization_config"] = transformers_fp8_config(block)
    else:
        config["quantization_config"] = compressed_tensors_config(strategy, activations)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def transformers_fp8_config(block: tuple[int, int]) -> dict:
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def compressed_tensors_config(strategy: str, activations: str) -> dict:
    def args(strategy: str, dynamic: bool, observer: str | None) -> dict:
        return {
            "actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": None, "num_bits": 8,
            "observer": observer, "observer_kwargs": {}, "strategy": strategy, "symmetric": True, "type": "float",
        }  # fmt: skip

    inputs = {
        "dynamic": args("token", True, None),
        "static": args("tensor", False, "minmax"),
        "none": None,
    }[activations]
    return {
        "config_groups": {
            "group_0": {
                "input_activations": inputs,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": args(strategy, False, "minmax"),
            }
        },
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": list(UNQUANTIZED),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def linear_modules(source: Path) -> set[str]:
    """Names of the checkpoint model's ``nn.Linear`` modules, lm_head excepted."""
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)} - set(UNQUANTIZED)


def calibrate_input_scales(source: Path, linears: set[str], prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Static per-tensor input scales: each layer's largest absolute input over ``prompts`` / 448."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    amax: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            value = inputs[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], value) if name in amax else value

        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in model.named_modules() if n in linears]
    with torch.no_grad():
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt"))
    for handle in handles:
        handle.remove()
    return {name: (value / FP8_MAX).clamp(min=MIN_SCALE).reshape(1) for name, value in amax.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="full-precision HF checkpoint directory")
    parser.add_argument("target", type=Path, help="directory to write the FP8 checkpoint into")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--strategy", choices=STRATEGIES, default="channel", help="compressed-tensors weight scales")
    parser.add_argument("--activations", choices=ACTIVATIONS, default="dynamic", help="compressed-tensors inputs")
    parser.add_argument("--block-size", type=int, nargs=2, default=list(DEFAULT_BLOCK), metavar=("N", "K"))
    parser.add_argument("--calibration-text", action="append", help="a calibration prompt (repeatable)")
    args = parser.parse_args()
    calibration = tuple(args.calibration_text) if args.calibration_text else DEFAULT_CALIBRATION
    out = write_fp8_checkpoint(
        args.source, args.target, args.format, args.strategy, args.activations, tuple(args.block_size), calibration
    )
    print(json.dumps({"target": str(out), "quantization_config": json.loads((out / "config.json").read_text())[
        "quantization_config"]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
