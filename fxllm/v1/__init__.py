"""Module paths of vLLM's V1 engine that scripts import from (``vllm.v1...`` -> ``fxllm.v1...``)."""
