"""Tensor parallelism as the compiler sees it (docs/ARCHITECTURE.md, contract 8).

Model code stays single-device: each rank builds its model from a TP-local view of
the config (``tp_config``), loads only its slices of the checkpoint (``sharding``),
and a graph pass inserts the collectives (``fxllm.passes.tensor_parallel``), which
are custom ops (``collectives``) so later passes can see and rewrite them.
"""
