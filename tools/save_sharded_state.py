"""Save a model as one weights file per tensor-parallel rank (vLLM's example of this name).

    python tools/save_sharded_state.py --model /path/to/llama --tensor-parallel-size 2 --output /path/to/sharded

Then ``LLM(model="/path/to/sharded", load_format="sharded_state", tensor_parallel_size=2)``
reads one file per rank, already sliced and fused. The config, tokenizer and
generation config are copied next to the rank files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def save_sharded_state(model: str, output: Path, tensor_parallel_size: int, device: str = "auto") -> None:
    from fxllm import LLM

    llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, device=device, enforce_eager=True)
    llm.save_sharded_state(output)
    for item in Path(model).iterdir():  # everything but the weights: config, tokenizer, ...
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name not in WEIGHT_INDEXES:
            shutil.copy2(item, output / item.name)
    del llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Hugging Face model directory")
    parser.add_argument("--output", required=True, type=Path, help="where to write the per-rank files")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    save_sharded_state(args.model, args.output, args.tensor_parallel_size, args.device)
    print(f"wrote {args.tensor_parallel_size} rank file(s) to {args.output}")


if __name__ == "__main__":
    main()
