"""Probe: GPTQ 4-bit and SparseGPT 50% on a tiny LlamaForCausalLM on CPU. See BASELINES_NOTES.md.

--lib llmcompressor (default): GPTQ W4A16(_ASYM) + SparseGPT 50% via oneshot. Needs its OWN venv
  (llmcompressor 0.14.0.1 pins transformers<=5.17.0; main venv has 5.23):
    python3 -m venv /tmp/venv-baselines && . /tmp/venv-baselines/bin/activate
    pip install torch==2.13.0 llmcompressor==0.14.0.1     # -> transformers 5.17.0, compressed-tensors 0.19.0
--lib gptqmodel: GPTQ only (no SparseGPT in gptqmodel), real CPU int4 kernel; works with transformers 5.23:
    pip install torch==2.13.0 transformers==5.23.0 optimum==2.3.0 gptqmodel==7.6.0   # 7.7.0 needs torch>=2.14.1
    export GPTQMODEL_CPU_WORKERS=2   # else on a 2-core box: "Virtual pool 'model_loader:cpu' requests 2 workers..."
Run:  python benchmarks/baselines_probe.py [--lib gptqmodel] [--hidden 256 --layers 4 --out /tmp/baselines_probe]
"""
import argparse, os, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--hidden", type=int, default=256); p.add_argument("--layers", type=int, default=4)
p.add_argument("--nsamples", type=int, default=16); p.add_argument("--seqlen", type=int, default=128)
p.add_argument("--scheme", default="W4A16_ASYM", help="W4A16 (sym) or W4A16_ASYM (asym zero-point); both group 128")
p.add_argument("--lib", default="llmcompressor", choices=["llmcompressor", "gptqmodel"])
p.add_argument("--out", default="/tmp/baselines_probe"); a = p.parse_args()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1024, hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_hidden_layers=a.layers,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
ids = torch.randint(0, cfg.vocab_size, (a.nsamples, a.seqlen)).tolist()  # random-token calibration data
x = torch.randint(0, cfg.vocab_size, (1, 64))
# oneshot insists on a processor when a dataset is given: a tiny offline word-level tokenizer is enough
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
_tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0"))
_tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=_tk, unk_token="t0", pad_token="t0", eos_token="t1")

def bench(m, tag):
    m.eval()
    with torch.no_grad():
        for _ in range(3): m(x)
        t = time.perf_counter()
        for _ in range(10): logits = m(x).logits
        fwd = (time.perf_counter() - t) / 10
        t = time.perf_counter(); g = m.generate(x[:, :8], max_new_tokens=16, do_sample=False); gen = time.perf_counter() - t
    print(f"[{tag}] fwd(1x64) {fwd*1e3:.1f} ms  generate16 {gen*1e3:.0f} ms  out={g[0, 8:12].tolist()}")
    return logits

if a.lib == "gptqmodel":
    from gptqmodel import GPTQModel, QuantizeConfig, BACKEND
    d0 = os.path.join(a.out, "dense"); LlamaForCausalLM(cfg).save_pretrained(d0); tok.save_pretrained(d0)
    ref = bench(AutoModelForCausalLM.from_pretrained(d0, dtype=torch.float32), "gptqmodel/dense")
    m = GPTQModel.load(d0, QuantizeConfig(bits=4, group_size=128, sym=a.scheme == "W4A16", desc_act=False, damp_percent=0.01), device="cpu")
    t = time.perf_counter(); m.quantize([{"input_ids": r, "attention_mask": [1] * a.seqlen} for r in ids], tokenizer=tok)
    print(f"[gptqmodel] quantize took {time.perf_counter() - t:.1f} s"); d = os.path.join(a.out, "gptqmodel_w4"); m.save(d)
    # gptq_torch_aten: aten._weight_int4pack_mm_for_cpu (real int4 GEMM, bf16 act); "torch" = dequantize + matmul
    q = GPTQModel.load(d, device="cpu", backend=BACKEND("gptq_torch_aten")).model  # or AutoModelForCausalLM.from_pretrained(d)
    print(f"[gptqmodel] qlinear: {type(q.model.layers[0].mlp.down_proj).__name__}")
    out = bench(q, "gptqmodel/gptq_torch_aten")
    print(f"[gptqmodel] rel.err logits vs dense {((out.float() - ref).norm() / ref.norm()).item():.4f}")
    raise SystemExit
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.pruning import SparseGPTModifier
# pre-tokenized: oneshot skips tokenizing when "input_ids" is present (but still wants a processor object)
calib = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * a.seqlen] * a.nsamples})
recipes = {"gptq_w4a16": GPTQModifier(targets="Linear", scheme=a.scheme, ignore=["lm_head"], dampening_frac=0.01, block_size=128),
           "sparsegpt_50": SparseGPTModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])}  # plain "lm_head" is NOT matched here
for name, recipe in recipes.items():
    # oneshot.validate_model re-reads model.config.name_or_path from disk: an in-memory model needs a saved copy
    d0 = os.path.join(a.out, "dense"); LlamaForCausalLM(cfg).save_pretrained(d0)
    base = AutoModelForCausalLM.from_pretrained(d0, dtype=torch.float32)
    ref = bench(base, f"{name}/dense")
    t = time.perf_counter()
    model = oneshot(model=base, dataset=calib, recipe=recipe, tokenizer=tok, num_calibration_samples=a.nsamples, max_seq_length=a.seqlen)
    print(f"[{name}] oneshot took {time.perf_counter() - t:.1f} s")
    w = model.model.layers[0].mlp.down_proj.weight
    print(f"[{name}] in-memory: down_proj type={type(model.model.layers[0].mlp.down_proj).__name__} "
          f"dtype={w.dtype} zero-frac={(w == 0).float().mean():.3f} uniq-in-row0={w[0].unique().numel()}")
    out = bench(model, f"{name}/in-memory (fake-quant)")
    d = os.path.join(a.out, name); model.save_pretrained(d, save_compressed=True)
    print(f"[{name}] saved: {sorted(os.listdir(d))}, size {sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))/1e6:.2f} MB")
    re = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    lin = re.model.layers[0].mlp.down_proj
    print(f"[{name}] reloaded down_proj: {type(lin).__module__}.{type(lin).__name__} "
          f"params={[(n, tuple(q.shape), q.dtype) for n, q in lin.named_parameters()]}")
    out2 = bench(re, f"{name}/reloaded")  # first forward fires ct_decompress_hook: packed int4 -> dense fp32 weight
    print(f"[{name}] after 1st forward: {[(n, q.dtype) for n, q in lin.named_parameters()]}")
    print(f"[{name}] rel.err logits vs dense {((out - ref).norm() / ref.norm()).item():.4f}; "
          f"reload vs in-memory max|diff| {(out2 - out).abs().max().item():.2e}")
