"""Shared-input fusion: same logits, same state dict, exact unfuse, and a saveable fused model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import calibration_ids, tiny_model
from optimum_odllm import ODLLMCompressor, ODLLMConfig
from optimum_odllm import fused as fused_module
from optimum_odllm.fused import fuse_at_load, fuse_shared_inputs, is_fused, unfuse_shared_inputs
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(scope="module")
def compressed():
    model = tiny_model("qwen2")  # q/k/v carry biases and GQA gives k/v other shapes than q
    compressor = ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8))
    compressor.compress(calibration_ids())
    return compressor


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_fusion_groups_siblings_keeps_logits_and_adds_no_memory(compressed):
    model = copy.deepcopy(compressed.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_shared_inputs(model) == 4  # (q,k,v) and (gate,up) in each of 2 layers
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    row = q.down.weight.stride(0) * q.down.weight.element_size()
    assert k.down.weight.data_ptr() == q.down.weight.data_ptr() + q.rank * row  # views of one stack
    assert v.down.weight.data_ptr() == k.down.weight.data_ptr() + k.rank * row
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in before.values())
    ids = calibration_ids(3, 12)
    torch.testing.assert_close(logits(model, ids), logits(compressed.model, ids), rtol=1e-5, atol=1e-5)


def test_siblings_called_in_any_order_or_alone_give_their_own_output(compressed):
    reference = copy.deepcopy(compressed.model.model.layers[1].self_attn)
    model = copy.deepcopy(compressed.model)
    fuse_shared_inputs(model)
    attn = model.model.layers[1].self_attn
    x, other = torch.randn(2, 5, attn.q_proj.in_features), torch.randn(2, 5, attn.q_proj.in_features)
    with torch.no_grad():
        for name in ("v_proj", "q_proj", "k_proj", "k_proj"):  # reversed order and a repeat
            torch.testing.assert_close(getattr(attn, name)(x), getattr(reference, name)(x))
        torch.testing.assert_close(attn.k_proj(other), reference.k_proj(other))
        torch.testing.assert_close(attn.q_proj(x), reference.q_proj(x))


def test_unfuse_is_an_exact_inverse(compressed):
    model = copy.deepcopy(compressed.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_shared_inputs(model)
    assert unfuse_shared_inputs(model) == 4 and not is_fused(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # every factor has its own storage again
    ids = calibration_ids(2, 9)
    assert torch.equal(logits(model, ids), logits(compressed.model, ids))


def test_fused_model_saves_and_reloads_bit_exact(compressed, tmp_path):
    fuse_shared_inputs(compressed.model)
    try:
        fused_state = {k: v.clone() for k, v in compressed.model.state_dict().items()}
        compressed.save_pretrained(tmp_path)
    finally:
        unfuse_shared_inputs(compressed.model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    state = loaded.state_dict()
    assert state.keys() == fused_state.keys() and all(torch.equal(state[n], fused_state[n]) for n in state)
    assert fuse_at_load(loaded) == 4  # and the reloaded model fuses again, with the same outputs
    ids = calibration_ids(2, 9)
    torch.testing.assert_close(logits(loaded, ids), logits(compressed.model, ids), rtol=1e-5, atol=1e-5)


def test_weights_written_after_fusion_are_used(compressed):
    model = copy.deepcopy(compressed.model)
    fuse_shared_inputs(model)
    new = {k: v + 0.01 * torch.randn_like(v) for k, v in compressed.model.state_dict().items()}
    model.load_state_dict(new)  # in-place copy through the views
    reference = copy.deepcopy(compressed.model)
    reference.load_state_dict(new)
    ids = calibration_ids(2, 9)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    model.load_state_dict(new, assign=True)  # new storage: the group restacks on the next call
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    model.double()  # .to() replaces every parameter's storage too
    torch.testing.assert_close(logits(model, ids), logits(reference.double(), ids), rtol=1e-9, atol=1e-9)


def test_fuse_at_load_leaves_offloaded_models_alone(compressed):
    model = copy.deepcopy(compressed.model)
    model.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": "disk"}
    assert fuse_at_load(model) == 0 and not is_fused(model)


def test_training_a_fused_model_reaches_every_down_factor(compressed):
    # the stacked down weight the group multiplies by carries no gradient: training must not use it
    fused, plain = copy.deepcopy(compressed.model), copy.deepcopy(compressed.model)
    assert fuse_shared_inputs(fused) > 0
    ids = torch.arange(3, 19)[None]
    for model in (fused, plain):
        model.train()
        model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in fused.named_parameters() if n.endswith("down.weight")}
    assert grads and all(g is not None for g in grads.values())
    for name, param in plain.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6)


class _CountProducts(TorchDispatchMode):
    """Counts the matrix products (what eager decoding pays a kernel launch for) run under it."""

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.PRODUCTS
        return func(*args, **(kwargs or {}))


def _products(call) -> int:
    with torch.no_grad(), _CountProducts() as counter:
        call()
    return counter.count


def test_equal_shaped_up_factors_share_one_batched_product(compressed, monkeypatch):
    model = copy.deepcopy(compressed.model)
    reference = copy.deepcopy(compressed.model)
    fuse_shared_inputs(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # k/v (GQA: not q's shape) and gate/up: their up weights (and k/v's biases) are views of one stack
    for first, second in ((attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        assert first.up.weight.shape == second.up.weight.shape
        stride = first.up.weight.numel() * first.up.weight.element_size()
        assert second.up.weight.data_ptr() == first.up.weight.data_ptr() + stride
    assert attn.v_proj.up.bias.data_ptr() == attn.k_proj.up.bias.data_ptr() + attn.k_proj.up.bias.numel() * 4
    x = torch.randn(2, 3, attn.q_proj.in_features)
    ref_attn = reference.model.layers[0].self_attn
    qkv = lambda a: [a.q_proj(x), a.k_proj(x), a.v_proj(x)]  # noqa: E731
    assert _products(lambda: qkv(ref_attn)) == 6  # unfused: two GEMMs each
    assert _products(lambda: qkv(attn)) == 4  # eager: one shared down GEMM, one up GEMM each
    monkeypatch.setattr(fused_module, "_in_graph", lambda x: True)  # as inside torch.compile / a CUDA graph
    assert _products(lambda: qkv(attn)) == 3  # one down GEMM + q's up + one baddbmm for k/v
    with torch.no_grad():
        for got, want in zip(qkv(attn), qkv(ref_attn)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_in_graphs_multi_head_qkv_take_fewer_products_than_the_dense_model(monkeypatch):
    dense = tiny_model("llama", num_key_value_heads=4)  # q, k and v share one shape
    model = copy.deepcopy(dense)
    ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8)).compress(calibration_ids())
    reference = copy.deepcopy(model)
    assert fuse_shared_inputs(model) == 4
    x = torch.randn(1, 1, 64)
    layer, dense_layer = model.model.layers[1].self_attn, dense.model.layers[1].self_attn
    assert _products(lambda: [dense_layer.q_proj(x), dense_layer.k_proj(x), dense_layer.v_proj(x)]) == 3
    ids = calibration_ids(2, 7)
    compiled = torch.compile(model, backend="eager", fullgraph=False)  # dynamo traces the group: _in_graph is True
    torch.testing.assert_close(logits(compiled, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(fused_module, "_in_graph", lambda x: True)
    assert _products(lambda: [layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)]) == 2  # one down, one bmm
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # decode with a cache: one token per step, the eager case the batching is for
        ref_cache, cache = (reference(ids, use_cache=True).past_key_values,
                             model(ids, use_cache=True).past_key_values)
        step = ids[:, -1:]
        torch.testing.assert_close(model(step, cache=cache).logits,
                                   reference(step, cache=ref_cache).logits, rtol=1e-5, atol=1e-5)


def test_batch_ups_always_batches_eagerly_and_never_does_not(compressed):
    reference = compressed.model
    ids = calibration_ids(2, 9)
    for mode, products in (("always", 3), ("never", 4), ("graphs", 4)):  # eager q/k/v under GQA (k/v share a shape)
        model = copy.deepcopy(reference)
        fuse_shared_inputs(model, batch_ups=mode)
        attn = model.model.layers[0].self_attn
        x = torch.randn(1, 1, attn.q_proj.in_features)
        assert _products(lambda: [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]) == products, mode
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_ups must be one of"):
        fuse_shared_inputs(copy.deepcopy(reference), batch_ups=True)


def test_the_group_checks_its_members_once_per_forward(compressed, monkeypatch):
    # eager decoding pays for every Python step: the siblings after the first take their output without checks
    model = copy.deepcopy(compressed.model)
    fuse_shared_inputs(model)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.__dict__["_odllm_group"]
    calls = []
    plain = group.plain
    monkeypatch.setattr(group, "plain", lambda: calls.append(1) or plain())
    x = torch.randn(1, 1, attn.q_proj.in_features)
    with torch.no_grad():
        attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        attn.q_proj(x)  # a new forward with the same tensor: checked again
    assert len(calls) == 2


def test_a_factor_wrapped_between_sibling_calls_is_not_skipped(compressed):
    # the group computes every sibling's output at the first call; a hook put on a sibling's factor before that
    # sibling is called must still run (review finding: the cached output was returned)
    model = copy.deepcopy(compressed.model)
    fuse_shared_inputs(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 3, attn.q_proj.in_features)
    with torch.no_grad():
        attn.q_proj(x)  # computes and caches k's and v's outputs too
        attn.k_proj.up.register_forward_hook(lambda module, args, out: out * 0)
        assert torch.count_nonzero(attn.k_proj(x)) == 0


def test_a_fused_model_compiled_after_an_unfused_one_gets_its_own_graph(monkeypatch):
    # dynamo shares compiled code between instances of one architecture; a guard must tell fused members from
    # unfused ones, or the fused model silently runs the unfused graph (right values, no fusion)
    unfused = tiny_model("llama", num_key_value_heads=4)
    ODLLMCompressor(unfused, ODLLMConfig(ratio=0.5, rank_multiple=8, refine_steps=0)).compress(calibration_ids())
    unfused.eval()
    model = copy.deepcopy(unfused)
    fuse_shared_inputs(model)
    ids = calibration_ids(2, 5)
    torch._dynamo.reset()
    logits(torch.compile(unfused, backend="eager"), ids)
    computed = []
    compute = fused_module.SharedInputGroup._compute
    monkeypatch.setattr(fused_module.SharedInputGroup, "_compute", lambda self, x: computed.append(1) or compute(self, x))
    torch.testing.assert_close(logits(torch.compile(model, backend="eager"), ids), logits(unfused, ids),
                               rtol=1e-5, atol=1e-5)
    assert len(computed) == 4  # (q,k,v) and (gate,up) of 2 layers, traced into the fused model's graph
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_ups_on_cuda_match_unfused_factors_in_bf16():
    dense = tiny_model("llama", num_key_value_heads=4)
    model = copy.deepcopy(dense)
    ODLLMCompressor(model, ODLLMConfig(ratio=0.5, rank_multiple=8)).compress(calibration_ids(), device="cpu")
    model = model.to("cuda", torch.bfloat16)
    reference = copy.deepcopy(model)
    assert fuse_shared_inputs(model) == 4
    ids = calibration_ids(2, 9).cuda()
    got, want = logits(model, ids).float(), logits(reference, ids).float()
    # cuBLAS may pick other kernels for bmm than for single GEMMs: equal up to bf16 rounding of the logits
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    compiled = torch.compile(model)  # inductor on CUDA: the batched up products (and Triton kernels at 1 token)
    torch.testing.assert_close(logits(compiled, ids).float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_a_copy_of_a_fused_model_runs_and_restacks_its_own_factors(compressed):
    model = copy.deepcopy(compressed.model)
    fuse_shared_inputs(model)
    clone = copy.deepcopy(model)  # e.g. the exporters copy a model before casting it
    ids = calibration_ids(2, 9)
    torch.testing.assert_close(logits(clone, ids), logits(compressed.model, ids), rtol=1e-5, atol=1e-5)
    group = clone.model.layers[0].self_attn.k_proj.__dict__["_odllm_group"]
    assert group.is_aliased() and group is not model.model.layers[0].self_attn.k_proj.__dict__["_odllm_group"]


def test_in_graphs_trainable_up_factors_still_get_their_gradients(compressed, monkeypatch):
    # batched products read the stacks, which are no parameters: a step that trains any factor must not use them
    fused, plain = copy.deepcopy(compressed.model), copy.deepcopy(compressed.model)
    fuse_shared_inputs(fused)
    monkeypatch.setattr(fused_module, "_in_graph", lambda x: True)
    ids = torch.arange(3, 19)[None]
    for model in (fused, plain):
        for name, param in model.named_parameters():
            param.requires_grad_(".up." in name)  # e.g. tuning up factors / biases only
        model.train()
        model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in fused.named_parameters() if ".up." in n}
    assert grads and all(g is not None for g in grads.values())
    for name, param in plain.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6)


class _Wrapper(torch.nn.Module):
    """Stands in for a peft adapter layer: the original factor lives on as ``base_layer``."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x):
        return self.base_layer(x) + 1.0


def test_a_wrapped_factor_takes_the_group_out_of_use_and_unfuses(compressed):
    model = copy.deepcopy(compressed.model)
    reference = copy.deepcopy(compressed.model)
    fuse_shared_inputs(model)
    for m in (model, reference):
        attn = m.model.layers[0].self_attn
        attn.v_proj.up = _Wrapper(attn.v_proj.up)  # wrapped after fusion, on one sibling only
    x = torch.randn(2, 3, 64)
    attn, ref_attn = model.model.layers[0].self_attn, reference.model.layers[0].self_attn
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(attn, name)(x), getattr(ref_attn, name)(x))
    assert unfuse_shared_inputs(model) == 4 and not is_fused(model)
    state, ref_state = model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


def test_compiled_calls_after_reloading_or_casting_read_the_new_factors(compressed):
    model = copy.deepcopy(compressed.model)
    fuse_shared_inputs(model)
    new = {k: v + 0.01 * torch.randn_like(v) for k, v in compressed.model.state_dict().items()}
    reference = copy.deepcopy(compressed.model)
    reference.load_state_dict(new)
    model.load_state_dict(new, assign=True)  # new storage, and no eager call before the compiled one
    ids = calibration_ids(2, 9)
    torch._dynamo.reset()
    torch.testing.assert_close(logits(torch.compile(model, backend="eager"), ids), logits(reference, ids),
                               rtol=1e-5, atol=1e-5)
    model.double()
    torch._dynamo.reset()
    torch.testing.assert_close(logits(torch.compile(model, backend="eager"), ids), logits(reference.double(), ids),
                               rtol=1e-9, atol=1e-9)
