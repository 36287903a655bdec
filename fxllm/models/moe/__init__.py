"""Mixture-of-experts layers: all of a layer's experts behind one custom op, ``fxllm::fused_moe``.

layer.py (``FusedMoE``: the stacked expert weights, and ``SparseMoeBlock``: router, experts and
an optional shared expert) -> fused_moe.py (the op, opaque to Dynamo but not a splitting op)
-> torch_experts.py (CPU: the exact reference path) or triton_experts.py (CUDA: a grouped GEMM
over tokens sorted by expert, which triton_routing.py routes and sorts without a host sync).
routing.py holds the routing rule both paths follow.
"""
