"""Convert a full-precision HF checkpoint directory into a pre-quantized INT4 / INT8 checkpoint.

    python tools/write_int_checkpoint.py SRC DST --format gptq --bits 4 --group-size 128 [--asym] [--desc-act] [--gptq-v2]
    python tools/write_int_checkpoint.py SRC DST --format awq --group-size 128
    python tools/write_int_checkpoint.py SRC DST --format compressed-tensors --bits 4 --group-size 128 [--asym]
    python tools/write_int_checkpoint.py SRC DST --format compressed-tensors --w8a8 dynamic|static

Weights are rounded to the nearest level from each group's minimum and maximum (what the
published tools' min-max observers do before GPTQ / AWQ refine them; the layout, not the
rounding, is what a loader has to get right). Quantized layers are the ``nn.Linear`` modules of
the transformers model except ``lm_head``; everything else is copied unchanged.

- ``gptq`` (AutoGPTQ / GPTQModel): ``X.qweight`` int32 [in / pack, out] (pack = 32 / bits
  values of consecutive inputs per word, lowest bits first), ``X.qzeros`` int32 [groups, out /
  pack] packed the same way along the outputs, storing ``zero - 1`` (checkpoint_format
  ``gptq``) or ``zero`` (``gptq_v2``), ``X.scales`` float16 [groups, out], ``X.g_idx`` int32 [in]
  (each input's group; with ``desc_act`` the groups are taken in a random order, as act-order
  takes them by decreasing activation statistics). ``real = (q - zero) * scale``; symmetric:
  zero = 2 ** (bits - 1). config.json: ``{"quant_method": "gptq", "bits", "group_size",
  "desc_act", "sym", "checkpoint_format", ...}``.
- ``awq`` (AutoAWQ, GEMM version): ``X.qweight`` int32 [in, out / 8] packed along the outputs
  in AutoAWQ's order (word nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i] of its 8),
  ``X.qzeros`` int32 [groups, out / 8] likewise, ``X.scales`` float16 [groups, out].
  config.json: ``{"quant_method": "awq", "bits": 4, "group_size", "zero_point": true,
  "version": "gemm"}``.
- ``compressed-tensors``: written by the compressed-tensors library itself (as llm-compressor
  saves models): its quantization config applied to the model, scales and zero points set
  from min-max observations (and, for static W8A8, calibrated input scales), then its
  ``ModelCompressor`` compresses and saves: ``pack-quantized`` W4A16 / W8A16 or
  ``int-quantized`` W8A8.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fxllm.models.quantization.int_pack import pack, pack_awq
from fxllm.models.weights import SAFETENSORS_INDEX, safetensors_files

FORMATS = ("gptq", "awq", "compressed-tensors")
W8A8_ACTIVATIONS = ("dynamic", "static")
UNQUANTIZED = ("lm_head",)
DEFAULT_GROUP_SIZE = 128
WHOLE_ROW = -1
DEFAULT_CALIBRATION = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a tiny model that learned to count: one two three four five.",
    "Compilers turn graphs into fast kernels; attention reads the paged cache.",
)
# GPTQ's and AWQ's smallest scale: a constant group still divides by something.
MIN_SCALE = 1e-5


def write_int_checkpoint(
    source: Path,
    target: Path,
    fmt: str,
    bits: int = 4,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
    desc_act: bool = False,
    gptq_v2: bool = False,
    w8a8: str | None = None,
    calibration: tuple[str, ...] = DEFAULT_CALIBRATION,
    seed: int = 0,
) -> Path:
    """Write ``source`` quantized as ``fmt`` into ``target``; return ``target``."""
    source, target = Path(source), Path(target)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "compressed-tensors":
        return _write_compressed_tensors(source, target, bits, group_size, symmetric, w8a8, calibration)
    if fmt == "awq" and (bits != 4 or symmetric is not False):
        raise ValueError("AutoAWQ's GEMM format is 4-bit with zero points (bits=4, symmetric=False)")
    linears = linear_modules(source)
    target.mkdir(parents=True, exist_ok=True)
    _copy_side_files(source, target)
    weight_map = {}
    for file in safetensors_files(source):
        tensors = {}
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                module = name.removesuffix(".weight")
                if not name.endswith(".weight") or module not in linears:
                    tensors[name] = tensor
                elif fmt == "gptq":
                    tensors.update(gptq_tensors(module, tensor, bits, group_size, symmetric, desc_act, gptq_v2, seed))
                else:
                    tensors.update(awq_tensors(module, tensor, group_size))
        save_file(tensors, str(target / file.name), metadata={"format": "pt"})
        weight_map.update({name: file.name for name in tensors})
    if (source / SAFETENSORS_INDEX).exists():
        (target / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = json.loads((source / "config.json").read_text())
    if fmt == "gptq":
        config["quantization_config"] = gptq_config(bits, group_size, symmetric, desc_act, gptq_v2)
    else:
        config["quantization_config"] = awq_config(group_size)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def gptq_config(bits: int, group_size: int, symmetric: bool, desc_act: bool, v2: bool) -> dict:
    return {
        "bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act, "sym": symmetric,
        "true_sequential": True, "lm_head": False, "quant_method": "gptq",
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }  # fmt: skip


def awq_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}  # fmt: skip


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, group_size] (one group of all inputs for WHOLE_ROW)."""
    size = weight.shape[1] if group_size == WHOLE_ROW else group_size
    if weight.shape[1] % size:
        raise ValueError(f"{weight.shape[1]} input features do not split into groups of {size}")
    return weight.float().reshape(weight.shape[0], -1, size)


def min_max_levels(
    groups: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's / AWQ's min-max rounding of [out, groups, size] values: (unsigned levels [out,
    groups, size], float16 scales [out, groups], zero points [out, groups]), 0 representable."""
    max_level = 2**bits - 1
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    if symmetric:
        high = torch.maximum(-low, high)
        low = -high
    scale = ((high - low) / max_level).clamp(min=MIN_SCALE).half()  # stored in float16: round with it
    if symmetric:
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
    else:
        zero = torch.round(-low / scale.float()).clamp(0, max_level).to(torch.int32)
    levels = (torch.round(groups / scale.float()[..., None]) + zero[..., None]).clamp(0, max_level)
    return levels.to(torch.int32), scale, zero


def act_order(module: str, in_features: int, seed: int) -> torch.Tensor:
    """A random input order, the same for the layers that read one input (q/k/v, gate/up: act-order
    sorts by the input's statistics)."""
    block = module.rpartition(".")[0]  # model.layers.0.self_attn
    generator = torch.Generator().manual_seed(seed + zlib.crc32(f"{block}/{in_features}".encode()))
    return torch.randperm(in_features, generator=generator)


def gptq_tensors(
    module: str, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, desc_act: bool, v2: bool,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    out_features, in_features = weight.shape
    size = in_features if group_size == WHOLE_ROW else group_size
    # g_idx: input k is in group g_idx[k]. Act-order quantizes the inputs in a permuted order,
    # groups of consecutive permuted inputs; without it, in order.
    order = act_order(module, in_features, seed) if desc_act else torch.arange(in_features)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // size).to(torch.int32)
    levels, scale, zero = min_max_levels(_groups(weight[:, order], group_size), bits, symmetric)
    levels = levels.reshape(out_features, in_features)
    natural = torch.empty_like(levels)
    natural[:, order] = levels  # back to the inputs' own order, as GPTQ stores them
    stored_zero = zero - (0 if v2 else 1)  # the original format's zero - 1
    mask = 2**bits - 1
    return {
        f"{module}.qweight": pack(natural.t(), bits, dim=0),  # [in / pack, out]
        f"{module}.qzeros": pack((stored_zero & mask).t(), bits, dim=1),  # [groups, out / pack]
        f"{module}.scales": scale.t().contiguous(),  # [groups, out]
        f"{module}.g_idx": g_idx,
    }


def awq_tensors(module: str, weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    out_features, in_features = weight.shape
    levels, scale, zero = min_max_levels(_groups(weight, group_size), 4, symmetric=False)
    return {
        f"{module}.qweight": pack_awq(levels.reshape(out_features, in_features).t()),  # [in, out / 8]
        f"{module}.qzeros": pack_awq(zero.t()),  # [groups, out / 8]
        f"{module}.scales": scale.t().contiguous(),  # [groups, out]
    }


def linear_modules(source: Path) -> set[str]:
    """Names of the checkpoint model's ``nn.Linear`` modules, lm_head excepted."""
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)} - set(UNQUANTIZED)


def _copy_side_files(source: Path, target: Path) -> None:
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.name not in ("config.json", SAFETENSORS_INDEX) and item.is_file():
            shutil.copy2(item, target / item.name)


# ---- compressed-tensors, through the library -------------------------------------------


def _write_compressed_tensors(
    source: Path, target: Path, bits: int, group_size: int, symmetric: bool, w8a8: str | None,
    calibration: tuple[str, ...],
) -> Path:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if w8a8 is None:
        strategy = "channel" if group_size == WHOLE_ROW else "group"
        weights = QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
            group_size=None if group_size == WHOLE_ROW else group_size,
        )  # fmt: skip
        inputs = None
        data_format = "pack-quantized"
    else:
        if w8a8 not in W8A8_ACTIVATIONS:
            raise ValueError(f"w8a8 must be one of {W8A8_ACTIVATIONS}, got {w8a8!r}")
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        inputs = QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="token" if w8a8 == "dynamic" else "tensor",
            dynamic=w8a8 == "dynamic",
        )  # fmt: skip
        data_format = "int-quantized"
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(UNQUANTIZED)))
    quantized = {name: m for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    with torch.no_grad():
        for module in quantized.values():
            groups = _groups(module.weight, WHOLE_ROW if weights.strategy == "channel" else group_size)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), weights)  # min-max observer
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
        if inputs is not None and not inputs.dynamic:
            for name, amax in _input_amax(model, source, quantized, calibration).items():
                scale, zero = calculate_qparams(-amax.reshape(1), amax.reshape(1), inputs)
                quantized[name].input_scale.copy_(scale.reshape(quantized[name].input_scale.shape))
                quantized[name].input_zero_point.copy_(zero.reshape(quantized[name].input_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, data_format)
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(str(target))
    _copy_side_files(source, target)
    # save_pretrained wrote the model's own config.json; keep it, quantization_config added.
    return target


def _input_amax(model: nn.Module, source: Path, modules: dict[str, nn.Module], prompts: tuple[str, ...]):
    """The largest absolute input each module sees over ``prompts`` (a static activation scale's observation)."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    amax: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            value = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], value) if name in amax else value

        return hook

    handles = [module.register_forward_pre_hook(observe(name)) for name, module in modules.items()]
    try:
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    return amax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="full-precision HF checkpoint directory")
    parser.add_argument("target", type=Path, help="directory to write the quantized checkpoint into")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="-1: one scale per output channel")
    parser.add_argument("--asym", action="store_true", help="zero points (AWQ always has them)")
    parser.add_argument("--desc-act", action="store_true", help="GPTQ act-order: inputs grouped out of order")
    parser.add_argument("--gptq-v2", action="store_true", help="GPTQ checkpoint_format gptq_v2 (zeros stored as is)")
    parser.add_argument("--w8a8", choices=W8A8_ACTIVATIONS, help="compressed-tensors W8A8 INT8 with these activations")
    args = parser.parse_args()
    symmetric = not args.asym and args.format != "awq"
    out = write_int_checkpoint(
        args.source, args.target, args.format, args.bits, args.group_size, symmetric, args.desc_act, args.gptq_v2,
        args.w8a8,
    )
    print(json.dumps({"target": str(out), "quantization_config": json.loads((out / "config.json").read_text())[
        "quantization_config"]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
