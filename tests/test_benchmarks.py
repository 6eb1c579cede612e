"""Fast checks of the benchmark helpers (ASVD/FWSVD baselines, rank allocation, size accounting)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
rc = pytest.importorskip("recsys_common")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_allocate_matches_compressor():
    from optimum_odllm import ODLLMCompressor, ODLLMConfig

    model = tiny_llama()
    ranks = rc.allocate(model, 0.5, 8)
    c = ODLLMCompressor(model, ODLLMConfig(ratio=0.5, whitening=False, progressive=False, rank_multiple=8))
    c.compress()
    assert {k: v for k, v in ranks.items() if v} == c.config.ranks


@pytest.mark.parametrize("scale", ["none", "col", "row"])
def test_scaled_svd_full_rank_is_exact(scale):
    model = tiny_llama()
    ref = {n: m.weight.detach().clone() for n, m in rc.decoder_linears(model).items()}
    full = {n: min(m.weight.shape) for n, m in rc.decoder_linears(model).items()}
    col = {n: torch.rand(m.in_features) + 0.1 for n, m in rc.decoder_linears(model).items()} if scale == "col" else None
    row = {n: torch.rand(m.out_features) + 0.1 for n, m in rc.decoder_linears(model).items()} if scale == "row" else None
    rc.scaled_svd_compress(model, full, col_scale=col, row_scale=row)
    for name, w in ref.items():
        assert torch.allclose(model.get_submodule(name).weight, w, atol=1e-5)


def test_scaled_svd_minimizes_weighted_error():
    """With column scales c, the rank-r result beats plain SVD in the ||(W - W') diag(c)|| metric."""
    torch.manual_seed(0)

    def holder(weight):
        root = nn.Module()
        root.m = nn.Module()
        root.m.layers = nn.ModuleList([nn.Module()])
        root.m.layers[0].proj = nn.Linear(24, 16, bias=False)
        root.m.layers[0].proj.weight.data.copy_(weight)
        return root

    w = torch.randn(16, 24)
    c = torch.logspace(-2, 1, 24)
    model, plain = holder(w), holder(w)
    rc.scaled_svd_compress(model, {"m.layers.0.proj": 4}, col_scale={"m.layers.0.proj": c})
    rc.scaled_svd_compress(plain, {"m.layers.0.proj": 4})
    err = lambda r: float(((r.m.layers[0].proj.weight - w) * c).norm())  # noqa: E731
    assert err(model) < err(plain)


def test_activation_scales_and_fisher_shapes():
    model = tiny_llama()
    cal = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [3, 4, 5]]
    scales = rc.activation_scales(model, cal, alpha=0.5)
    fisher = rc.fisher_row_importance(model, cal)
    for name, m in rc.decoder_linears(model).items():
        assert scales[name].shape == (m.in_features,) and bool((scales[name] > 0).all())
        assert fisher[name].shape == (m.out_features,) and bool((fisher[name] >= 0).all())
    assert all(p.grad is None for p in model.parameters())


def test_gptq_bits_accounting():
    assert rc.gptq_storage_bits_per_weight(128) == pytest.approx(4 + 16 / 128 + 4 / 128)


def test_gptq_dense_baseline_layer0_equals_solver_on_its_inputs():
    """Layer 0 sees the dense embeddings whatever happens later, so its quantized weights must equal the GPTQ
    solver applied to an independently collected input covariance; every row group holds at most 2**bits codes."""
    from optimum_odllm.quantization import dequantize, quantize_weight

    model = tiny_llama(seed=1)
    calibration = [[(3 * k + j) % 64 for j in range(12)] for k in range(6)]
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    handle = q.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, 32).double()) or None)
    with torch.no_grad():
        for ids in calibration:
            model(input_ids=torch.tensor([ids]), use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    expected = dequantize(quantize_weight(q.weight.detach(), x.T @ x, 3, 32, "gptq"), q.weight.dtype)
    rc.gptq_dense_fake_quantize(model, calibration, bits=3, group_size=128)  # g128 shrinks to the 32-wide input
    assert torch.equal(q.weight, expected)
    for m in rc.decoder_linears(model).values():
        assert max(len(torch.unique(row)) for row in m.weight.detach()) <= 2 ** 3


def test_spectrum_allocation_keeps_budget_and_favours_flat_spectra():
    ra = pytest.importorskip("rank_allocation")
    from optimum_odllm.ranks import ModuleShape, allocate_ranks, kept_parameters

    shapes = [ModuleShape("peaked", 256, 256), ModuleShape("flat", 256, 256)]
    energies = {"peaked": [100.0] * 8 + [0.01] * 248, "flat": [1.0] * 256}
    ranks = ra.allocate_by_spectrum(shapes, energies, 0.5, 8)
    uniform = allocate_ranks(shapes, 0.5, 8)
    assert kept_parameters(shapes, ranks) <= 0.5 * 2 * 256 * 256
    assert ranks["flat"] > uniform["flat"] and ranks["peaked"] == uniform["peaked"] // 2  # the floor
    assert ranks["flat"] % 8 == 0 and ranks["peaked"] % 8 == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_weights_swaps_every_decoder_linear_and_matches_dequantized(bits):
    # speed.py's int8/int4/dense_int4 variants: every decoder projection becomes integer codes, nothing else changes
    import copy

    from common import integer_weights, lowrank_like
    from optimum_odllm.quantization import QuantizedFactor, QuantizedLowRankLinear, dequantize_model

    for lowrank in (False, True):
        model = tiny_llama(3)
        if lowrank:
            lowrank_like(model, 0.5, rank_multiple=32)
        quantized = integer_weights(copy.deepcopy(model), bits, group_size=32)
        kinds = {type(m) for n, m in quantized.named_modules() if ".layers." in n and n.endswith("_proj")}
        assert kinds == ({QuantizedLowRankLinear} if lowrank else {QuantizedFactor})
        assert isinstance(quantized.lm_head, nn.Linear)
        if lowrank:
            reference = dequantize_model(copy.deepcopy(quantized))
        else:  # dense codes back to float nn.Linear weights
            from optimum_odllm.lowrank import set_submodule

            reference = copy.deepcopy(quantized)
            for name, module in list(reference.named_modules()):
                if isinstance(module, QuantizedFactor):
                    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                    linear.weight.data = module.dequantized_weight()
                    set_submodule(reference, name, linear)
        ids = torch.randint(0, 64, (1, 9))
        with torch.no_grad():  # same codes as float weights: only kernel rounding (bf16 activations) differs
            out = quantized(ids).logits
            torch.testing.assert_close(out, reference(ids).logits, atol=0.05, rtol=0.05)
            assert not torch.allclose(out, model(ids).logits, atol=1e-6)  # the weights really were rounded


def test_recovery_variants_need_epochs():
    qr = pytest.importorskip("quantized_recsys")
    args = qr.parse_args(["--variants", "odllm,odllm+recovery", "--ratios", "0.5"])
    with pytest.raises(SystemExit, match="--recovery-epochs"):
        qr.labels_to_run(args)
    args = qr.parse_args(["--variants", "odllm+recovery", "--ratios", "0.5", "0.3", "--recovery-epochs", "1"])
    assert qr.labels_to_run(args) == [("odllm+recovery@0.5", "odllm+recovery", 0.5),
                                      ("odllm+recovery@0.3", "odllm+recovery", 0.3)]


def test_dense_recovery_control_runs_once_without_ratio():
    qr = pytest.importorskip("quantized_recsys")
    args = qr.parse_args(["--variants", "dense+recovery,odllm+recovery", "--ratios", "0.5", "--recovery-epochs", "1"])
    assert qr.labels_to_run(args) == [("dense+recovery", "dense+recovery", 1.0),
                                      ("odllm+recovery@0.5", "odllm+recovery", 0.5)]


def test_quality_plot_points_mean_over_seeds_and_aliases():
    """Each curve point is the mean over seeds of "kept" with the standard error over seeds; an alias puts a
    variant measured under another name on the named curve, sorted by bytes."""
    plot = pytest.importorskip("plot_quality_vs_bytes")
    per_seed = {
        str(s): {"dense": {"kept": 1.0, "bytes_vs_bf16": 1.0},
                 "odllm+refine@0.5": {"variant": "odllm+refine", "kept": k5, "bytes_vs_bf16": 0.499},
                 "odllm@0.7": {"variant": "odllm", "kept": k7, "bytes_vs_bf16": 0.699},
                 "gptq-w4": {"variant": "gptq-w4", "kept": 0.99, "bytes_vs_bf16": 0.266}}
        for s, (k5, k7) in enumerate([(0.90, 1.00), (1.00, 0.94), (0.95, 0.97)])
    }
    curves = plot.points({"per_seed": per_seed}, {"odllm+refine": "odllm"})
    assert set(curves) == {"odllm", "gptq-w4"}
    (b5, m5, se5, l5), (b7, m7, se7, l7) = curves["odllm"]
    assert (b5, l5, b7, l7) == (0.499, "odllm+refine@0.5", 0.699, "odllm@0.7")
    assert m5 == pytest.approx(0.95) and se5 == pytest.approx(0.05 / 3 ** 0.5)  # s.d. 0.05 over 3 seeds
    assert m7 == pytest.approx(0.97) and se7 == pytest.approx(0.03 / 3 ** 0.5)
    assert plot.points({"per_seed": per_seed}).keys() == {"odllm", "odllm+refine", "gptq-w4"}  # no alias: apart


def test_dense_training_gets_the_weight_decay_and_a_reused_model_keeps_its_own_recipe(tmp_path, monkeypatch):
    """--weight-decay reaches the Trainer; a later run reusing --out-dir with other flags records the settings the
    saved model was trained with, not its own (result files used to show the script's defaults)."""
    qr = pytest.importorskip("quantized_recsys")
    seen = {}

    def fake_training(model, tokenizer, samples, output_dir, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(qr, "train_recommender", fake_training)
    index_of = qr.build_item_index
    index_kwargs = {}

    def fast_index(*a, **k):
        index_kwargs.update(k)
        return index_of(*a, **{**k, "steps": 20})

    monkeypatch.setattr(qr, "build_item_index", fast_index)
    flags = ["--heads", "2", "--out-dir", str(tmp_path), "--device", "cpu"]
    args = qr.parse_args(["--layers", "1", "--hidden-size", "32", "--weight-decay", "0.3", "--attention-dropout", "0.2",
                          "--item-embeddings", "collaborative", *flags])
    data = qr.load_movielens_100k(None)
    split = qr.leave_one_out(data.sequences, history=args.history)
    qr.train_or_load(0, args, data, split)
    assert seen["weight_decay"] == 0.3 and seen["learning_rate"] == args.lr and seen["epochs"] == args.epochs
    # the index is built from the training sequences only (validation/test targets excluded)
    assert index_kwargs["backend"] == "collaborative" and list(index_kwargs["sequences"]) == list(split.train.values())
    recipe = qr.trained_recipe(tmp_path / "seed0" / "dense")
    assert recipe == {"layers": 1, "hidden_size": 32, "heads": 2, "epochs": args.epochs, "lr": args.lr,
                      "batch_size": 64, "weight_decay": 0.3, "history": 20, "attention_dropout": 0.2,
                      "item_embeddings": "collaborative", "seed": 0}
    seen.clear()
    other = qr.parse_args(["--layers", "4", "--hidden-size", "256", "--weight-decay", "0.9", *flags])
    model, _, _ = qr.train_or_load(0, other, data, split)
    assert not seen and model.config.num_hidden_layers == 1  # loaded, not trained again
    assert qr.trained_recipe(tmp_path / "seed0" / "dense") == recipe
    assert qr.trained_recipe(tmp_path / "nothing") is None


def test_recsys_speed_search_switches_take_the_layouts_they_name(monkeypatch):
    """--compare-repeated / --compare-reorder time the older searches: inside their context managers the beam search
    must repeat the prompt's cache per beam (and, for the second, reorder whole rows); outside, it must not."""
    from transformers.cache_utils import DynamicCache

    from optimum_odllm.recsys.trie import PrefixTrie, constrained_beam_search

    rs = pytest.importorskip("recsys_speed")
    calls = {"repeat": 0, "reorder": 0}
    repeat, reorder = DynamicCache.batch_repeat_interleave, DynamicCache.reorder_cache

    def counted(name, method):
        def wrapper(self, *a, **k):
            calls[name] += 1
            return method(self, *a, **k)
        return wrapper

    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", counted("repeat", repeat))
    monkeypatch.setattr(DynamicCache, "reorder_cache", counted("reorder", reorder))
    model = tiny_llama()
    trie = PrefixTrie([(10 + a, 20 + b, 30 + c) for a in range(3) for b in range(3) for c in range(2)])
    prompts = torch.randint(3, 9, (2, 5))
    searches = {}
    for label, context in (("default", None), ("repeated", rs.repeated_prompt), ("reorder", rs.whole_cache_reorder)):
        before = dict(calls)
        if context is None:
            searches[label] = constrained_beam_search(model, prompts, trie, num_beams=4)
        else:
            with context():
                searches[label] = constrained_beam_search(model, prompts, trie, num_beams=4)
        searches[label] = (searches[label][0], {k: calls[k] - before[k] for k in calls})
    assert searches["default"][1] == {"repeat": 0, "reorder": 0}
    assert searches["repeated"][1] == {"repeat": 1, "reorder": 0}  # in-place reorder of the generated positions
    assert searches["reorder"][1] == {"repeat": 1, "reorder": 1}  # whole rows, at the one intermediate step
    assert searches["default"][0] == searches["repeated"][0] == searches["reorder"][0]


def test_recsys_speed_single_user_times_the_cached_and_the_rebuilt_trie(monkeypatch):
    """--single-user alternates one request with the encoder's trie already built and one that must build it."""
    from types import SimpleNamespace

    rs = pytest.importorskip("recsys_speed")

    class Encoder:  # builds its trie on first use, like InstructionEncoder.trie
        _trie = None

        @property
        def trie(self):
            self._trie = self._trie or "built"
            return self._trie

    encoder = Encoder()
    seen = []
    monkeypatch.setattr(rs, "time_users", lambda model, enc, users, *a: seen.append(enc._trie) or 0.01 * len(seen))
    results = {"variants": {"dense": {}, "odllm": {}}}
    args = SimpleNamespace(rounds=2)
    rs.single_user_latency({"dense": None, "odllm": None}, encoder, ["u1", "u2"], args, "cpu", results)
    assert seen == ["built", None] * 8  # 2 rounds x 2 variants x 2 requests, cached then rebuilt
    assert set(results["variants"]["odllm"]) == {"single_user_ms", "single_user_ms_trie_per_request"}


def test_item_code_probe_against_hand_counts():
    import math

    from optimum_odllm.recsys.data import Example

    probe = pytest.importorskip("item_code_probe")
    codes = [(0, 0), (0, 1), (1, 0), (1, 1)]  # items 0-3: first codes 0, 0, 1, 1
    train = {"u": [0, 2, 1, 3, 0, 2], "v": [1, 1]}  # first-code transitions: 0->1 x3, 1->0 x2, 0->0 x1
    examples = [Example("u", (2, 0), 3), Example("v", (1,), 0)]  # 0 -> 1 (the most frequent: hit), 0 -> 0 (miss)
    got = probe.prefix_predictability(codes, train, examples, levels=1, codebook_size=2)
    assert got["top1"] == 0.5
    expected = (math.log((3 + 0.1) / (4 + 0.2)) + math.log((1 + 0.1) / (4 + 0.2))) / 2
    assert got["loglik"] == pytest.approx(expected) and got["uniform_loglik"] == pytest.approx(-math.log(2))


def test_speed_interleaved_decode_alternates_the_order_and_takes_medians(monkeypatch):
    """--rounds: every variant once per round, every other round reversed, so no variant is always timed first."""
    from types import SimpleNamespace

    speed = pytest.importorskip("speed")
    calls = []

    class Model:
        def __init__(self, label):
            self.label = label

        def generate(self, ids, max_new_tokens, **kwargs):
            calls.append((self.label, max_new_tokens))
            return ids

    def fake_median_time(fn, warmup=0, repeat=1, cuda=None):
        before = len(calls)
        fn()
        label, n = calls[before]
        return {"dense": 0.002, "fused": 0.001}[label] * n + 0.05  # per-token cost + a fixed prefill

    monkeypatch.setattr(speed, "median_time", fake_median_time)
    args = SimpleNamespace(vocab=50, decode_prompt=4, decode_tokens=9, rounds=3)
    variants = [("dense", Model("dense"), False), ("fused", Model("fused"), False), ("kernels", Model("k"), True)]
    row = speed.interleaved_decode(variants, 1, args, "cpu", compiled=False)
    timed = [label for label, n in calls if n == 9][2:]  # after the two first calls
    assert timed == ["dense", "fused", "fused", "dense", "dense", "fused"]  # kernels: compiled only
    assert row["dense_ms_per_token"] == pytest.approx(2.0) and row["fused_ms_per_token"] == pytest.approx(1.0)
    assert len(row["fused_ms_per_token_rounds"]) == 3 and row["mode"] == "eager, interleaved"


def test_speed_interleaved_prefill_alternates_the_order_and_takes_medians(monkeypatch):
    """--rounds also times prefill round-robin (the kernels variant is not timed: eager, it equals fused)."""
    from types import SimpleNamespace

    speed = pytest.importorskip("speed")
    order, costs = [], {"dense": [0.004, 0.009, 0.004], "lowrank": [0.002, 0.002, 0.007]}

    def fake_prefill(model, batch, length, vocab, device, repeat):
        order.append(model)
        return costs[model][sum(1 for m in order if m == model) - 1]

    monkeypatch.setattr(speed, "prefill", fake_prefill)
    args = SimpleNamespace(vocab=50, rounds=3, repeat=2)
    variants = [("dense", "dense", False), ("lowrank", "lowrank", False), ("kernels", "kernels", True)]
    row = speed.interleaved_prefill(variants, 1, 8, args, "cpu")
    assert order == ["dense", "lowrank", "lowrank", "dense", "dense", "lowrank"]
    assert row["dense_ms"] == pytest.approx(4.0) and row["lowrank_ms"] == pytest.approx(2.0)  # medians, not means
    assert row["lowrank_ms_rounds"] == pytest.approx([2.0, 2.0, 7.0]) and "kernels_ms" not in row


def test_speed_host_stages_count_one_guard_check_and_one_compiled_region_per_call():
    """The profile's host stages come from real profiler events: per compiled call one dynamo guard check
    ("TorchDynamo Cache Lookup") and one compiled region; eager ops outside the graph count under ``aten::``."""
    speed = pytest.importorskip("speed")
    compiled = torch.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), backend="eager")
    x = torch.randn(2, 8)
    compiled(x)

    def profiled(eager_ops: int) -> dict:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                compiled(x)
            for _ in range(eager_ops):
                torch.sigmoid(x)
        return speed.host_stages(prof.key_averages())

    few, more = profiled(0), profiled(5)
    assert few["TorchDynamo Cache Lookup"]["calls"] == 3 and few["Torch-Compiled Region"]["calls"] == 3
    assert few["Torch-Compiled Region"]["ms"] > 0
    assert more["aten::"]["calls"] == few["aten::"]["calls"] + 5  # each eager sigmoid is one aten:: event


def test_speed_python_hotspots_see_generate_and_one_model_forward_per_token():
    """cProfile of one static-cache ``generate``: rows sorted by own time; ``generate`` itself is among them and
    the decoder's forward runs once per generated token."""
    speed = pytest.importorskip("speed")
    rows = speed.python_hotspots(tiny_llama(), batch=1, prompt=4, tokens=3, vocab=64, device="cpu", top=2000)
    own = [row["own_ms"] for row in rows]
    assert own == sorted(own, reverse=True)
    names = {row["function"].rsplit(":", 1)[-1]: row for row in rows}
    assert names["generate"]["calls"] == 1
    decoder = [row for row in rows if "modeling_llama" in row["function"] and row["function"].endswith(":forward")
               and row["calls"] == 3]
    assert decoder  # LlamaModel.forward / LlamaForCausalLM.forward: three tokens, three calls


def test_forward_ab_binds_a_commits_forward_path_to_the_same_buffers(monkeypatch):
    # forward_ab.py times the per-call path of a git commit against the working tree: the reference modules must
    # run the commit's methods (not the working tree's) on the same integer buffers, with the same result.
    import forward_ab
    from optimum_odllm.lowrank import LowRankLinear
    from optimum_odllm.quantization import QuantizedLowRankLinear

    import subprocess

    try:
        reference = forward_ab.module_at("HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("needs a git checkout (forward_ab reads a commit's source with git show)")
    assert reference.QuantizedFactor is not forward_ab.qlowrank.QuantizedFactor
    torch.manual_seed(0)
    model = nn.Sequential(QuantizedLowRankLinear.from_lowrank(LowRankLinear(64, 48, 32, bias=True), None, 8, 128, "rtn"))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    expected = model(x)
    assert forward_ab.bind_reference_path(model, reference) == 2
    calls = []
    original = reference.QuantizedFactor.forward
    monkeypatch.setattr(reference.QuantizedFactor, "forward", lambda self, t: calls.append(1) or original(self, t))
    forward_ab.bind_reference_path(model, reference)
    assert torch.equal(model(x), expected) and len(calls) == 2


def test_quantized_speed_bytes_read_count_the_tied_head_once():
    # A decode step reads every weight once; the tied lm_head reads the whole embedding table, an int8 head instead
    # of it is counted in the variant's own buffers.
    import quantized_speed as qs

    embed = nn.Embedding(100, 8)

    class Tiny(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.embed, self.layer, self.lm_head = embed, nn.Linear(8, 8, bias=False), head

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.lm_head

    tied = nn.Linear(8, 100, bias=False)
    tied.weight = embed.weight
    int_head = qs.QuantizedFactor(8, 100, 8)
    read = qs.bytes_read_per_token({"dense_bf16": Tiny(tied), "head8": Tiny(int_head)}, embed.weight)
    assert read["dense_bf16"] == 64 * 4 + 800 * 4
    assert read["head8"] == 64 * 4 + 800 + 100 * 2
