"""Inference-time fusion of sibling low-rank factors gives the same logits."""

from __future__ import annotations

import copy

import torch

from conftest import calibration_ids, tiny_model
from optimum_odllm import ODLLMCompressor, ODLLMConfig
from optimum_odllm.fused import FusedDownFollower, FusedDownLeader, fuse_shared_inputs


def compressed_model():
    model = tiny_model("llama")
    ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8)).compress(calibration_ids())
    return model


def test_fusion_groups_qkv_and_gate_up_and_keeps_logits():
    model = compressed_model()
    fused = copy.deepcopy(model)
    assert fuse_shared_inputs(fused) == 4  # (q,k,v) and (gate,up) in each of 2 layers
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedDownLeader) and isinstance(attn.v_proj, FusedDownFollower)
    assert attn.q_proj.down.out_features == sum(
        model.model.layers[0].self_attn.get_submodule(n).rank for n in ("q_proj", "k_proj", "v_proj")
    )
    ids = calibration_ids(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_follower_called_alone_uses_its_own_slice():
    model = compressed_model()
    reference = model.model.layers[0].mlp.up_proj
    fuse_shared_inputs(model)
    follower = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, reference.in_features)
    with torch.no_grad():
        torch.testing.assert_close(follower(x), reference(x))
