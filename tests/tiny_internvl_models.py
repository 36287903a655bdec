"""Tiny random InternLM2 and InternVL checkpoints in their original layouts, each with the same
weights re-laid into a transformers model that serves as the oracle: InternLM2 as
``LlamaForCausalLM``, the original InternVL as transformers' ``InternVLForConditionalGeneration``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny_models import VOCAB_SIZE, build_tokenizer, randomize_

INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
# InternLM2's shape at a tiny size: grouped KV heads, biases on wqkv and wo, dynamic NTK RoPE
# (as the released checkpoints have) over a short original length, so tests can pass it.
INTERNLM2_MAX_POSITIONS = 48
INTERNLM2_ROPE_FACTOR = 2.0
_INTERNLM2_SHAPE = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=INTERNLM2_MAX_POSITIONS, rms_norm_eps=1e-6, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
_ROPE_THETA = 10000.0


def internlm2_config_json(**shape) -> dict:
    """config.json of an InternLM2 checkpoint, remote-code references and all."""
    shape = {**_INTERNLM2_SHAPE, **shape}
    return dict(
        architectures=["InternLM2ForCausalLM"], auto_map=INTERNLM2_AUTO_MAP, model_type="internlm2", hidden_act="silu",
        bias=True, rope_theta=_ROPE_THETA, rope_scaling={"type": "dynamic", "factor": INTERNLM2_ROPE_FACTOR},
        attn_implementation="eager", torch_dtype="float32", **shape,
    )


def llama_twin_config(**shape) -> LlamaConfig:
    """The transformers Llama that computes what the InternLM2 config describes."""
    shape = {**_INTERNLM2_SHAPE, **shape}
    rope = {"rope_type": "dynamic", "factor": INTERNLM2_ROPE_FACTOR, "rope_theta": _ROPE_THETA}
    return LlamaConfig(**shape, attention_bias=True, rope_parameters=rope, architectures=["LlamaForCausalLM"])


def llama_to_internlm2(state: dict[str, torch.Tensor], config: LlamaConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """A transformers Llama state dict in InternLM2's names, q/k/v fused into wqkv per KV group."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    group = heads // kv_heads
    renames = [
        ("model.embed_tokens.", "model.tok_embeddings."), ("lm_head.", "output."), (".self_attn.o_proj.", ".attention.wo."),
        (".mlp.gate_proj.", ".feed_forward.w1."), (".mlp.up_proj.", ".feed_forward.w3."),
        (".mlp.down_proj.", ".feed_forward.w2."), (".input_layernorm.", ".attention_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
    ]
    out = {}
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            query = tensor.reshape(kv_heads, group, head_dim, *tensor.shape[1:])
            key = state[name.replace("q_proj", "k_proj")].reshape(kv_heads, 1, head_dim, *tensor.shape[1:])
            value = state[name.replace("q_proj", "v_proj")].reshape(kv_heads, 1, head_dim, *tensor.shape[1:])
            fused = torch.cat([query, key, value], dim=1).reshape(-1, *tensor.shape[1:])
            out[prefix + name.replace(".self_attn.q_proj.", ".attention.wqkv.")] = fused.contiguous()
            continue
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        for old, new in renames:
            name = name.replace(old, new)
        out[prefix + name] = tensor.contiguous()
    return out


def save_tiny_internlm2(root: Path, seed: int = 0, **shape) -> tuple[Path, Path]:
    """(InternLM2 checkpoint, its transformers Llama twin) under ``root``."""
    config = llama_twin_config(**shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    randomize_(model, seed)
    twin_dir, internlm2_dir = root / "llama_twin", root / "internlm2"
    model.save_pretrained(twin_dir)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(twin_dir)
    internlm2_dir.mkdir(parents=True)
    save_file(llama_to_internlm2(model.state_dict(), config), str(internlm2_dir / "model.safetensors"))
    (internlm2_dir / "config.json").write_text(json.dumps(internlm2_config_json(**shape), indent=2))
    tokenizer.save_pretrained(internlm2_dir)
    return internlm2_dir, twin_dir


def hf_greedy_token_by_token(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle for RoPE that depends on the sequence length: every token, prompt tokens too, goes
    through its own forward with a KV cache, so each is rotated as a sequence of its length is."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids, generated = list(prompt_ids), []
    with torch.no_grad():
        for position in range(len(prompt_ids) + max_new_tokens - 1):
            logits = model(
                input_ids=torch.tensor([[ids[position]]]), position_ids=torch.tensor([[position]]), cache=cache, use_cache=True
            ).logits
            if position >= len(prompt_ids) - 1:
                ids.append(int(logits[0, -1].argmax()))
                generated.append(ids[-1])
    return generated


# ---- InternVL ----------------------------------------------------------------------------

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
IMG_START, IMG_END, IMG_CONTEXT = VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2  # ids after the tiny tokenizer's
INTERNVL_VOCAB_SIZE = VOCAB_SIZE + 16
TILE = 56
VISION_PATCH = 14
DOWNSAMPLE_RATIO = 0.5
TOKENS_PER_TILE = int((TILE // VISION_PATCH) ** 2 * DOWNSAMPLE_RATIO**2)  # 4
MAX_TILES = 6
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
INTERNVL_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
}
_TEXT_SHAPE = dict(
    vocab_size=INTERNVL_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
# Vision towers of both norms, with and without q/k norms; the original layout's feature layer
# may stop before the last block.
_VISION_VARIANTS = {
    "layer_norm": dict(norm_type="layer_norm", use_qk_norm=False),
    "rms_norm_qk_norm": dict(norm_type="rms_norm", use_qk_norm=True),
}
# language model -> (vision variant, select_layer)
INTERNVL_LANGUAGE_MODELS = {
    "internlm2": ("layer_norm", -1),
    "qwen2": ("rms_norm_qk_norm", -2),
    "phi3": ("layer_norm", -1),
}


def _text_config(language_model: str) -> dict:
    """The decoder the transformers twin holds (InternLM2 as its Llama twin)."""
    if language_model == "internlm2":
        twin = llama_twin_config(vocab_size=INTERNVL_VOCAB_SIZE, max_position_embeddings=512)
        return twin.to_dict()
    if language_model == "qwen2":
        return dict(model_type="qwen2", max_position_embeddings=512, **_TEXT_SHAPE)
    return dict(
        model_type="phi3", max_position_embeddings=512, original_max_position_embeddings=512, partial_rotary_factor=0.5,
        **_TEXT_SHAPE,
    )


def _vision_config(variant: str) -> dict:
    return dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=TILE,
        patch_size=VISION_PATCH, attention_bias=True, layer_norm_eps=1e-6, hidden_act="gelu", **_VISION_VARIANTS[variant],
    )


def build_internvl_tokenizer(directory: Path):
    """The tiny tokenizer with InternVL's image tokens, named as transformers' processor reads them."""
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
    tokenizer.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["extra_special_tokens"] = IMAGE_TOKENS
    config_file.write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)  # config.json may name remote code
    assert tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]) == [IMG_START, IMG_END, IMG_CONTEXT]
    return tokenizer


def save_internvl_hf(directory: Path, language_model: str, feature_layer: int, pil_processor: bool, seed: int = 0):
    """A transformers-layout InternVL checkpoint with its processor; returns the model."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, InternVLVideoProcessor
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    variant, _ = INTERNVL_LANGUAGE_MODELS[language_model]
    config = InternVLConfig(
        text_config=_text_config(language_model), vision_config=_vision_config(variant), image_token_id=IMG_CONTEXT,
        image_seq_length=TOKENS_PER_TILE, downsample_ratio=DOWNSAMPLE_RATIO, vision_feature_layer=feature_layer,
        tie_word_embeddings=False, architectures=["InternVLForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).float()
    randomize_(model, seed)
    model.save_pretrained(directory)
    image_processor_class = GotOcr2ImageProcessorPil if pil_processor else GotOcr2ImageProcessor
    image_processor = image_processor_class(
        size={"height": TILE, "width": TILE}, max_patches=MAX_TILES, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    processor = InternVLProcessor(
        image_processor=image_processor, tokenizer=build_internvl_tokenizer(directory),
        video_processor=InternVLVideoProcessor(), image_seq_length=TOKENS_PER_TILE,
    )
    processor.save_pretrained(directory)
    return model


def _original_vision_name(name: str) -> str:
    pieces = (
        ("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
        ("model.vision_tower.embeddings.patch_embeddings.projection", "vision_model.embeddings.patch_embedding"),
        ("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
        ("model.vision_tower.encoder.layer.", "vision_model.encoder.layers."),
        (".attention.projection_layer.", ".attn.proj."), (".attention.q_norm.", ".attn.q_norm."),
        (".attention.k_norm.", ".attn.k_norm."), (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."),
        (".lambda_1", ".ls1"), (".lambda_2", ".ls2"),
        ("model.multi_modal_projector.layer_norm.", "mlp1.0."), ("model.multi_modal_projector.linear_1.", "mlp1.1."),
        ("model.multi_modal_projector.linear_2.", "mlp1.3."),
    )
    for old, new in pieces:
        name = name.replace(old, new)
    return name


def internvl_hf_to_original(state: dict[str, torch.Tensor], language_model: str, text_config) -> dict[str, torch.Tensor]:
    """transformers' InternVL state dict in the original layout's names."""
    out, language = {}, {}
    for name, tensor in state.items():
        if name.startswith("model.language_model."):
            language["model." + name[len("model.language_model.") :]] = tensor
        elif name.startswith("lm_head."):
            language[name] = tensor
        elif ".attention.q_proj." in name:
            parts = [state[name.replace("q_proj", piece)] for piece in ("q_proj", "k_proj", "v_proj")]
            out[_original_vision_name(name).replace(".attention.q_proj.", ".attn.qkv.")] = torch.cat(parts)
        elif ".attention.k_proj." not in name and ".attention.v_proj." not in name:
            out[_original_vision_name(name)] = tensor
    if language_model == "internlm2":
        out.update(llama_to_internlm2(language, text_config, prefix="language_model."))
    else:
        out.update({"language_model." + name: tensor for name, tensor in language.items()})
    return {name: tensor.contiguous() for name, tensor in out.items()}


def _llm_config_json(language_model: str, text_config) -> dict:
    if language_model == "internlm2":
        return internlm2_config_json(vocab_size=INTERNVL_VOCAB_SIZE, max_position_embeddings=512)
    fields = text_config.to_dict()
    fields["architectures"] = [{"qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}[language_model]]
    return fields


def save_tiny_internvl(root: Path, language_model: str, seed: int = 0) -> tuple[Path, Path]:
    """(original-layout InternVLChatModel checkpoint, its transformers twin with a PIL image processor)."""
    variant, select_layer = INTERNVL_LANGUAGE_MODELS[language_model]
    twin_dir, original_dir = root / f"twin_{language_model}", root / f"internvl_chat_{language_model}"
    twin = save_internvl_hf(twin_dir, language_model, select_layer, pil_processor=True, seed=seed)
    original_dir.mkdir(parents=True)
    save_file(internvl_hf_to_original(twin.state_dict(), language_model, twin.config.text_config), str(original_dir / "model.safetensors"))
    vision = _vision_config(variant)
    config = dict(
        architectures=["InternVLChatModel"], auto_map=INTERNVL_AUTO_MAP, model_type="internvl_chat",
        downsample_ratio=DOWNSAMPLE_RATIO, dynamic_image_size=True, force_image_size=TILE, max_dynamic_patch=MAX_TILES,
        min_dynamic_patch=1, use_thumbnail=True, ps_version="v2", select_layer=select_layer, template="internlm2-chat",
        torch_dtype="float32", llm_config=_llm_config_json(language_model, twin.config.text_config),
        vision_config=dict(
            architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=vision["hidden_size"],
            image_size=TILE, patch_size=VISION_PATCH, num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"], qkv_bias=True,
            qk_normalization=vision["use_qk_norm"], norm_type=vision["norm_type"], layer_norm_eps=1e-6, hidden_act="gelu",
            num_channels=3,
        ),
    )
    (original_dir / "config.json").write_text(json.dumps(config, indent=2))
    build_internvl_tokenizer(original_dir)
    return original_dir, twin_dir


def original_internvl_pixels(image, max_tiles: int = MAX_TILES, min_tiles: int = 1, use_thumbnail: bool = True) -> torch.Tensor:
    """The oracle's pixels for the original layout, as InternVL's published preprocessing makes them:
    the tile grid transformers' GotOcr2 picks, PIL's resize (bicubic) to it, crops row by row, a
    thumbnail of the whole image, then torchvision's Resize / ToTensor / Normalize per tile."""
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    transform = T.Compose([
        T.Resize((TILE, TILE), interpolation=InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    image = image.convert("RGB")
    columns, rows = get_optimal_tiled_canvas((image.height, image.width), (TILE, TILE), min_tiles, max_tiles)
    resized = image.resize((TILE * columns, TILE * rows))
    tiles = [
        resized.crop((i % columns * TILE, i // columns * TILE, (i % columns + 1) * TILE, (i // columns + 1) * TILE))
        for i in range(columns * rows)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((TILE, TILE)))
    return torch.stack([transform(tile) for tile in tiles])
