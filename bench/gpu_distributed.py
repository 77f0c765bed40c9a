"""Two GPUs through accelerate: DDP speed-up and loss parity on the Qwen2.5-7B architecture, FSDP-QLoRA on Qwen2.5-72B's.

Every leg is qlora_nb's own `train()`, started the way a user starts it: plain `python` for one GPU, `accelerate launch`
with the shipped configs/accelerate/*.yaml for two. Random weights (speed and memory do not depend on the values):
  A  1 GPU          7B, batch 1 x accumulation 8 (config.yaml's settings)     throughput baseline, parity reference
  B  2 GPUs, DDP    7B, batch 1 x accumulation 8 (same per-GPU settings)      throughput: target >= 1.8 x A
  C  2 GPUs, DDP    7B, batch 1 x accumulation 4 (same global batch as A)     loss parity with A, step by step
  F  2 GPUs, FSDP2  72B, pre-quantized NF4 packed in bf16, batch 1, 512 tok   per-GPU peak memory, tokens/s
The 72B model is never held in 16 bits: `build_prequantized` draws each weight on the GPU, quantizes it with
bitsandbytes and writes the packed 4-bit tensors and their quantization state as a pre-quantized checkpoint (~41 GB, not
145 GB), which transformers loads like any pre-quantized bitsandbytes model. It is built in a child process on GPU 1
while leg C runs (C's losses are the point there, not its speed), so the whole run fits one `run` call.

  python bench/gpu_distributed.py --tokenizer .whl/qwen2.5-tokenizer                  # 2-GPU machine, ~6 min
  python bench/gpu_distributed.py --tokenizer DIR --part ddp   (or --part fsdp)        # the two halves separately
  python bench/gpu_distributed.py --smoke                                              # CPU: the same flow, tiny models

--smoke runs every leg on this CPU over gloo: the tiny model stands in for the 7B and a tiny pre-quantized model for
the 72B, which is first checked to give the same logits as quantizing the same weights on load; FSDP runs through a
test-only patch of accelerate (which runs FSDP on GPUs only). --deadline (default 500 s) bounds the whole script: a leg
that would start with less than its minimum left is skipped, and a running leg is stopped (SIGTERM to the launcher,
then SIGKILL to every process under it) 10 s before the deadline; each leg prints a line per step as it goes, so a
stopped leg still reports what it did. Output: a line per leg, a Markdown table, the parity table; results.json,
results.md and the legs' logs in --out (default $OUT when set, else the work folder).
"""
import argparse, json, os, re, shutil, signal, subprocess, sys, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACC = REPO/'configs'/'accelerate'
QWEN25_72B = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
SAFE_ENV = dict(NCCL_NVLS_ENABLE='0', TORCH_SYMM_MEM_DISABLE_MULTICAST='1', NVSHMEM_DISABLE_NVLS='1')  # never NVLink multicast
LINEAR = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj')


# ---------------------------------------------------------------------------------------------------------------------
# A random Qwen2 model written straight into a pre-quantized 4-bit checkpoint, one weight at a time
def linear_shapes(cfg) -> dict:
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return dict(zip(LINEAR, [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]))

def quantize_weight(w, storage, device) -> dict:
    "The state-dict entries bitsandbytes' Linear4bit saves for weight `w`: NF4 codes packed in `storage`, and the quant state."
    import torch
    from bitsandbytes.nn import Params4bit
    p = Params4bit(w, requires_grad=False, quant_type='nf4', compress_statistics=True, quant_storage=storage)
    p = p.to(device) if torch.device(device).type == 'cuda' else p._quantize(torch.device(device))
    return {'weight': p.data.detach().cpu(), **{f'weight.{k}': v.detach().cpu() for k, v in p.quant_state.as_dict(packed=True).items()}}

def build_prequantized(out, cfg, tokenizer_dir, device, storage=None, seed=0, std=0.02, shard_gib=5.0, keep_bf16=False, log=print):
    "A random-weight Qwen2 model as a pre-quantized NF4 (double-quant) checkpoint in `out`; returns the bf16 weights if `keep_bf16`."
    import torch
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, GenerationConfig
    out, storage = Path(out), storage or torch.bfloat16
    if (out/'config.json').exists() and not keep_bf16: log(f'reusing {out}'); return None
    tmp = out.with_name(out.name + '.partial'); shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir(parents=True)
    t0, gen, kept = time.time(), torch.Generator(device=device).manual_seed(seed), {}
    rnd = lambda shape: (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16)
    st = dict(shard={}, size=0, n=0, total=0, index={})
    def flush():
        if not st['shard']: return
        st['n'] += 1; fn = f'model-{st["n"]:05d}.safetensors'
        save_file(st['shard'], str(tmp/fn), metadata={'format': 'pt'})
        st['index'].update(dict.fromkeys(st['shard'], fn)); st['shard'], st['size'] = {}, 0
    def add(name, t, dense=None):
        st['shard'][name] = t.contiguous(); nb = t.numel() * t.element_size(); st['size'] += nb; st['total'] += nb
        if keep_bf16 and dense is not None: kept[name] = dense.cpu()
        if st['size'] >= shard_gib * 2**30: flush()
    emb = rnd((cfg.vocab_size, cfg.hidden_size)).cpu(); add('model.embed_tokens.weight', emb, emb)
    ones, zeros = (lambda: torch.ones(cfg.hidden_size, dtype=torch.bfloat16)), (lambda n: torch.zeros(n, dtype=torch.bfloat16))
    for li in range(cfg.num_hidden_layers):
        pre = f'model.layers.{li}.'
        for name, shape in linear_shapes(cfg).items():
            w = rnd(shape)
            if keep_bf16: kept[f'{pre}{name}.weight'] = w.cpu()
            for k, v in quantize_weight(w, storage, device).items(): add(f'{pre}{name}.{k}', v)
            if name in LINEAR[:3]: b = zeros(shape[0]); add(f'{pre}{name}.bias', b, b)  # Qwen2 has q/k/v biases
        for n in ('input_layernorm', 'post_attention_layernorm'): t = ones(); add(f'{pre}{n}.weight', t, t)
        if (li + 1) % 10 == 0: log(f'  {li + 1}/{cfg.num_hidden_layers} layers quantized, {st["total"] / 2**30:.1f} GiB, {time.time() - t0:.0f} s')
    t = ones(); add('model.norm.weight', t, t)
    if not cfg.tie_word_embeddings: head = rnd((cfg.vocab_size, cfg.hidden_size)).cpu(); add('lm_head.weight', head, head)
    flush()
    (tmp/'model.safetensors.index.json').write_text(json.dumps({'metadata': {'total_size': st['total']}, 'weight_map': st['index']}))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=storage)
    d = cfg.to_dict(); d.update(quantization_config=q.to_dict(), dtype='bfloat16')
    (tmp/'config.json').write_text(json.dumps(d, indent=2, default=str))
    GenerationConfig(bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id, eos_token_id=[cfg.eos_token_id, cfg.pad_token_id]).save_pretrained(tmp)
    for f in Path(tokenizer_dir).iterdir():
        if f.name in ('vocab.json', 'merges.txt', 'tokenizer_config.json', 'tokenizer.json', 'chat_template.jinja'): shutil.copy(f, tmp/f.name)
    shutil.rmtree(out, ignore_errors=True); os.replace(tmp, out)
    log(f'built pre-quantized random {cfg.model_type} ({cfg.num_hidden_layers} layers): {st["total"] / 2**30:.1f} GiB in {st["n"]} '
        f'shards, {time.time() - t0:.0f} s -> {out}')
    return kept if keep_bf16 else None

def check_prequantized(work, tiny) -> float:
    "CPU: the builder's checkpoint of the tiny architecture gives the logits of quantizing the same bf16 weights on load."
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    sys.path.insert(0, str(REPO))
    from qlora_nb.model import keep_cpu_layout
    cfg = AutoConfig.from_pretrained(tiny)
    kept = build_prequantized(work/'pq-check', cfg, tiny, 'cpu', keep_bf16=True, log=lambda *a: None)
    ref = work/'pq-check-bf16'; ref.mkdir(exist_ok=True); cfg.save_pretrained(ref)
    save_file(kept, str(ref/'model.safetensors'), metadata={'format': 'pt'})
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    load = lambda p, **kw: keep_cpu_layout(AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16, device_map={'': 'cpu'}, **kw))
    ids = torch.arange(5, 70).view(1, -1)
    with torch.no_grad(): a, b = (m(input_ids=ids).logits.float() for m in (load(work/'pq-check'), load(ref, quantization_config=q)))
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# One leg: qlora_nb's train() in a child (or under accelerate launch), reporting per process and per step
LEG = r'''
import json, os, sys, time
rank = int(os.environ.get("RANK", 0))
if os.environ.get("FSDP_ON_CPU") == "1":  # --smoke only: accelerate runs FSDP on GPUs only; make its CPU process group FSDP
    import accelerate.state as S
    from accelerate.utils import DistributedType
    _init = S.AcceleratorState.__init__
    def _fsdp_on_cpu(self, *a, **k):
        _init(self, *a, **k)
        if k.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, k["fsdp_plugin"]
            if self._mixed_precision != "no": k["fsdp_plugin"].set_mixed_precision(self._mixed_precision)
    S.AcceleratorState.__init__ = _fsdp_on_cpu
    import qlora_nb.distributed
    qlora_nb.distributed.FSDP_DEVICES = ("cuda", "cpu")
import torch
from transformers import TrainerCallback
from qlora_nb.config import load_config
from qlora_nb.metrics import read_metrics
from qlora_nb.train import train
cuda = torch.cuda.is_available()
gib = lambda b: round(b / 2**30, 2)
def emit(tag, d):  # one write per record, so the lines of two processes sharing the pipe do not interleave
    os.write(1, (f"{tag} {rank} " + json.dumps(d, default=str) + "\n").encode())

class Probe(TrainerCallback):
    "Per process: peak GPU memory while loading/wrapping and in the training loop; time and global tokens of each step."
    def on_train_begin(self, args, state, control, model=None, **kw):
        self.load_peak = gib(torch.cuda.max_memory_allocated()) if cuda else None
        if cuda: torch.cuda.reset_peak_memory_stats()
        self.t0, self.marks = time.time(), []
        self.wrap = dict(model=type(model).__name__, sharded=sum(hasattr(p, "placements") for p in model.parameters()),
                         trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        emit("WRAP", dict(self.wrap, load_peak_gib=self.load_peak))
    def on_step_end(self, args, state, control, **kw):
        if cuda: torch.cuda.synchronize()
        self.marks.append((state.global_step, time.time(), state.num_input_tokens_seen))
        emit("STEP", dict(step=state.global_step, t=round(time.time() - self.t0, 2), tokens=state.num_input_tokens_seen,
                          peak_gib=gib(torch.cuda.max_memory_allocated()) if cuda else None))
    def on_train_end(self, args, state, control, **kw):
        (s0, t0, k0), (s1, t1, k1) = self.marks[0], self.marks[-1]
        emit("PROBE", dict(rank=rank, world=args.world_size, steps=len(self.marks), first_step_s=round(t0 - self.t0, 2),
              timed_steps=s1 - s0, seconds=round(t1 - t0, 2), tokens=k1 - k0, tokens_per_s=round((k1 - k0) / (t1 - t0), 1) if t1 > t0 else None,
              load_peak_gib=self.load_peak, loop_peak_gib=gib(torch.cuda.max_memory_allocated()) if cuda else None,
              loop_reserved_gib=gib(torch.cuda.max_memory_reserved()) if cuda else None, **self.wrap))

cfg = load_config(sys.argv[1], sys.argv[2:])
t = time.time()
res = train(cfg, overwrite=True, callbacks=[Probe()])
if res.adapter_dir:
    rows = read_metrics(cfg.output_dir/"metrics.jsonl")
    ck = res.checkpoints[-1] if res.checkpoints else None
    sys.stdout.flush(); emit("LEG", dict(wall_s=round(time.time() - t, 1), metrics=res.metrics, adapter_files=sorted(p.name for p in res.adapter_dir.iterdir()),
          checkpoint=ck.name if ck else None, checkpoint_files=sorted(p.name for p in ck.iterdir()) if ck else None,
          steps=[dict(step=r["step"], loss=r["loss"], grad_norm=r.get("grad_norm")) for r in rows if "loss" in r]))
'''

def kill_tree(p, grace=15):
    "Stop a leg: SIGTERM to the launcher (torchrun forwards it), then SIGKILL to it and every process under it."
    import psutil
    try: procs = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
    except psutil.NoSuchProcess: return
    try: p.send_signal(signal.SIGTERM); p.wait(grace)
    except subprocess.TimeoutExpired: pass
    for q in procs:
        try: q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess: pass
    psutil.wait_procs(procs, timeout=30)

def run_leg(name, work, cfg_path, nproc, accel_cfg=None, timeout=600, env=None, port=29500, overrides=()):
    "Start one leg, stream its output; return (returncode, [PROBE per rank], LEG dict or None, [STEP dicts of rank 0], wall s)."
    leg = work/'leg.py'; leg.write_text(LEG)
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]), PYTHONUNBUFFERED='1',
             HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', **SAFE_ENV, **(env or {}))
    if accel_cfg is None: cmd = [sys.executable, str(leg)]
    else: cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(accel_cfg), '--num_processes', str(nproc),
                 '--main_process_port', str(port), str(leg)]
    cmd += [str(cfg_path), *overrides]
    how = 'python' if accel_cfg is None else f'accelerate launch --config_file configs/accelerate/{Path(accel_cfg).name} --num_processes {nproc}'
    print(f'\n=== leg {name}: {how} ... {Path(cfg_path).name} (stopped after {timeout:.0f} s)', flush=True)
    t, lines = time.time(), []
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def pump():
        for line in p.stdout:
            lines.append(line)
            if line.startswith(('STEP 0', 'WRAP', 'PROBE', 'LEG', 'Traceback')) or 'Error' in line:
                sys.stdout.write(f'[{name} {time.time() - t:4.0f}s] {line.rstrip()[:300]}\n'); sys.stdout.flush()
    th = threading.Thread(target=pump, daemon=True); th.start()
    try: p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f'*** leg {name}: still running at its {timeout:.0f} s limit (--deadline): stopping it', flush=True)
        kill_tree(p)
    th.join(timeout=10)
    text = ''.join(lines)
    (work/f'leg_{name}.log').write_text(text)
    records = []  # (tag, rank, dict), found anywhere in the output
    for m in re.finditer(r'\b(WRAP|STEP|PROBE|LEG) (\d+) (?=\{)', text):
        try: records.append((m[1], int(m[2]), json.JSONDecoder().raw_decode(text, m.end())[0]))
        except ValueError: pass
    get = lambda tag, rank=None: [d for t_, r_, d in records if t_ == tag and rank in (None, r_)]
    probes = sorted(get('PROBE'), key=lambda d: d['rank'])
    legj = next(iter(get('LEG')), None)
    steps, wraps = get('STEP', 0), sorted(get('WRAP'), key=lambda d: d.get('rank', 0))
    return p.returncode, probes, legj, steps, wraps, time.time() - t

def summarize(name, what, rc, probes, legj, steps, wraps, wall):
    tps = probes[0]['tokens_per_s'] if probes else None
    if tps is None and len(steps) >= 2:  # stopped before the end: tokens/s from the steps it finished
        tps = round((steps[-1]['tokens'] - steps[0]['tokens']) / (steps[-1]['t'] - steps[0]['t']), 1) if steps[-1]['t'] > steps[0]['t'] else None
    r = dict(leg=name, what=what, rc=rc, wall_s=round(wall, 1), tokens_per_s=tps, processes=len(probes) or len(wraps),
             steps_done=steps[-1]['step'] if steps else 0,
             load_peak_gib=[p['load_peak_gib'] for p in probes] or [w.get('load_peak_gib') for w in wraps],
             loop_peak_gib=[p['loop_peak_gib'] for p in probes], loop_reserved_gib=[p['loop_reserved_gib'] for p in probes],
             timed=f"{probes[0]['timed_steps']} steps, {probes[0]['tokens']} tokens, {probes[0]['seconds']:.1f} s" if probes else None,
             first_step_s=probes[0]['first_step_s'] if probes else None, wrap=wraps[0] if wraps else None,
             steps=(legj or {}).get('steps'), adapter_files=(legj or {}).get('adapter_files'),
             checkpoint=(legj or {}).get('checkpoint'), checkpoint_files=(legj or {}).get('checkpoint_files'))
    print(f'--- leg {name}: rc {rc}, {wall:.0f} s; ' + (f'{tps:.0f} tokens/s (all GPUs); ' if tps else 'no timing; ')
          + f'peak GiB per process: load {r["load_peak_gib"]}, loop {r["loop_peak_gib"]}', flush=True)
    return r

def write_config(work, name, model_dir, base, ta, data=None, quant=None):
    "A qlora_nb YAML for one leg: `base` with this model, the shipped data, an output folder and these overrides."
    import yaml
    cfg = yaml.safe_load(base.read_text())
    cfg.update(model_name_or_path=str(model_dir), dataset_path=str(REPO/'data'/'novel_finetuning_dataset.jsonl'),
               output_dir=str(work/'out'/name), resume_from_checkpoint=False)
    cfg['training_args'].update(ta)
    cfg.setdefault('data', {}).update(data or {})
    cfg.setdefault('quantization_config', {}).update(quant or {})
    path = work/f'{name}.yaml'
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path

def parity(a, c, tol):
    sa, sc = {s['step']: s for s in a or []}, {s['step']: s for s in c or []}
    rows = [(k, sa[k]['loss'], sc[k]['loss'], sa[k].get('grad_norm'), sc[k].get('grad_norm')) for k in sorted(set(sa) & set(sc))]
    worst = max((abs(x - y) for _, x, y, _, _ in rows), default=None)
    return dict(steps=len(rows), max_abs_loss_diff=worst, tolerance=tol, passed=worst is not None and worst <= tol, rows=rows)

BUILD72 = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from gpu_distributed import build_prequantized, QWEN25_72B
from transformers import Qwen2Config
build_prequantized(sys.argv[2], Qwen2Config(**QWEN25_72B), sys.argv[3], "cuda")
'''
BUILD7 = r'''
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from gpu_real_path import build_random_7b
build_random_7b(Path(sys.argv[2]), Path(sys.argv[3]))
'''


# ---------------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--tokenizer', type=Path, help='folder with the Qwen2.5 tokenizer files (GPU run)')
    ap.add_argument('--work', type=Path, help='models and runs (default: /tmp/qbd or another folder with more free disk; /tmp/qbd-smoke)')
    ap.add_argument('--out', type=Path, help='results.json, results.md and the leg logs (default $OUT, else --work)')
    ap.add_argument('--part', choices=['all', 'ddp', 'fsdp'], default='all')
    ap.add_argument('--steps', type=int, default=5, help='optimizer steps of legs A, B, C (the first is not timed)')
    ap.add_argument('--fsdp-steps', type=int, default=5, help='optimizer steps of leg F (a checkpoint at the one before last)')
    ap.add_argument('--fsdp-max-length', type=int, default=512)
    ap.add_argument('--deadline', type=float, default=500, help='seconds for the whole script (see above)')
    ap.add_argument('--parity-tol', type=float, default=0.02, help='max |loss(1 GPU) - loss(2 GPUs)| per step (bf16); compared within the '
                    'first epoch (at the end of an epoch that does not split evenly, accelerate repeats examples to fill the processes)')
    ap.add_argument('--smoke', action='store_true', help='CPU: tiny models over gloo; FSDP through a test-only patch')
    a = ap.parse_args()
    T0 = time.time()
    left = lambda: a.deadline - (time.time() - T0)
    def free_gib(p):
        while not p.exists(): p = p.parent
        return shutil.disk_usage(p).free / 2**30
    work = a.work or (Path('/tmp/qbd-smoke') if a.smoke else max((Path(p) for p in ('/tmp/qbd', '/var/tmp/qbd', REPO.parent/'qbd_work')), key=free_gib))
    if not a.smoke and not a.tokenizer and (REPO/'.whl'/'qwen2.5-tokenizer').is_dir(): a.tokenizer = REPO/'.whl'/'qwen2.5-tokenizer'
    work.mkdir(parents=True, exist_ok=True)
    out = a.out or (Path(os.environ['OUT']) if os.environ.get('OUT') else work)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(SAFE_ENV)
    import torch
    results = dict(started=time.strftime('%Y-%m-%dT%H:%M:%S%z'), smoke=a.smoke, part=a.part, legs=[], notes=[])
    results['versions'] = {m: __import__(m).__version__ for m in ('torch', 'transformers', 'peft', 'accelerate', 'bitsandbytes')}
    def save():
        results['total_s'] = round(time.time() - T0, 1)
        (out/'results.json').write_text(json.dumps(results, indent=1, default=str))

    if a.smoke:
        os.environ.setdefault('OMP_NUM_THREADS', '1')
        tiny = REPO/'data'/'tiny_qwen'
        tok_dir, model7, base = tiny, tiny, REPO/'config_test.yaml'
        common = dict(per_device_train_batch_size=1, logging_steps=1, eval_strategy='no', save_strategy='no', report_to='none',
                      gradient_checkpointing=False, warmup_steps=0, disable_tqdm=True)
        data7, ga = dict(max_length=256), 4
        from transformers import AutoConfig
        cfg72, quant72, fsdp_env = AutoConfig.from_pretrained(tiny), dict(bnb_4bit_compute_dtype='bfloat16'), dict(FSDP_ON_CPU='1', ACCELERATE_USE_CPU='true')
        results['device'] = 'cpu (smoke)'
        d = check_prequantized(work, tiny)
        results['prequantized_check_max_abs_logit_diff'] = d
        print(f'pre-quantized checkpoint vs quantized on load (tiny architecture, CPU): max |Δlogit| {d:.3g}', flush=True)
        if d != 0: results['notes'].append('pre-quantized check FAILED')
    else:
        if not a.tokenizer: ap.error('--tokenizer DIR (the Qwen2.5 tokenizer files) is needed on the GPU machine')
        n = torch.cuda.device_count()
        results['device'] = f'{n} x {torch.cuda.get_device_name(0)}' if n else 'no GPU'
        print(f'torch {torch.__version__}, {results["device"]}, work {work} ({shutil.disk_usage(work).free / 2**30:.0f} GiB free)', flush=True)
        if n < 2: save(); sys.exit('needs 2 GPUs')
        tok_dir, model7, base = a.tokenizer.resolve(), work/'qwen2.5-7b-random', REPO/'config.yaml'
        common = dict(logging_steps=1, eval_strategy='no', save_strategy='no', report_to='none', dataloader_num_workers=0, disable_tqdm=True)
        data7, ga = {}, 8
        from transformers import Qwen2Config
        cfg72, quant72, fsdp_env = Qwen2Config(**QWEN25_72B), {}, {}
    model72 = work/('tiny-random-nf4' if a.smoke else 'qwen2.5-72b-random-nf4')
    builder = None
    def build72(gpu='1'):
        "Start building the 72B checkpoint in a child process on GPU `gpu`: (Popen, start time); on --smoke build the tiny one here."
        if a.smoke:
            t = time.time(); build_prequantized(model72, cfg72, tok_dir, 'cpu', log=lambda *x: None)
            results['build_72b_s'] = round(time.time() - t, 1); return None
        print(f'building the 72B pre-quantized checkpoint on GPU {gpu} in the background', flush=True)
        e = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]), **SAFE_ENV)
        return subprocess.Popen([sys.executable, '-c', BUILD72, str(REPO/'bench'), str(model72), str(tok_dir)], env=e), time.time()

    def leg(name, what, minimum, **kw):
        minimum = 10 if a.smoke else minimum
        if left() < minimum: print(f'*** skipping leg {name}: {left():.0f} s left of --deadline, it needs ~{minimum}', flush=True); return None
        r = summarize(name, what, *run_leg(name, work, timeout=max(5, left() - 10), **kw))
        results['legs'].append(r); save(); return r

    def over(**ta): return {**common, **ta}
    m7, m72 = ('tiny (for 7B)', 'tiny pre-quantized (for 72B)') if a.smoke else ('7B', '72B')
    if a.part in ('all', 'ddp'):
        if not a.smoke:
            t = time.time()
            subprocess.run([sys.executable, '-c', BUILD7, str(REPO/'bench'), str(model7), str(tok_dir)], check=True,
                           env=dict(os.environ, CUDA_VISIBLE_DEVICES='0', **SAFE_ENV))
            results['build_7b_s'] = round(time.time() - t, 1)
        A = leg('A', f'{m7}, 1 GPU, batch 1 x acc {ga}', 90,
                cfg_path=write_config(work, 'A', model7, base, over(max_steps=a.steps, gradient_accumulation_steps=ga), data7), nproc=1,
                env=None if a.smoke else dict(CUDA_VISIBLE_DEVICES='0'))
        B = leg('B', f'{m7}, 2 GPUs DDP, batch 1 x acc {ga} (same per GPU)', 90, nproc=2, accel_cfg=ACC/'ddp.yaml', port=29511,
                cfg_path=write_config(work, 'B', model7, base, over(max_steps=a.steps, gradient_accumulation_steps=ga), data7))
        if a.part == 'all' and left() > 300: builder = build72()  # overlaps leg C: its losses matter there, not its speed
        C = leg('C', f'{m7}, 2 GPUs DDP, batch 1 x acc {ga // 2} (same global batch as A)', 80, nproc=2, accel_cfg=ACC/'ddp.yaml', port=29512,
                cfg_path=write_config(work, 'C', model7, base, over(max_steps=a.steps, gradient_accumulation_steps=ga // 2), data7))
        if A and B and A['tokens_per_s'] and B['tokens_per_s']: results['ddp_speedup'] = round(B['tokens_per_s'] / A['tokens_per_s'], 3)
        if A and C: results['parity'] = parity(A['steps'], C['steps'], a.parity_tol)
        if builder and C: results['notes'].append('leg C shared GPU 1 with the 72B build: its tokens/s is not a figure')
        if not a.smoke and a.part == 'ddp': shutil.rmtree(model7, ignore_errors=True)
        save()
    if a.part in ('all', 'fsdp'):
        if not a.smoke: shutil.rmtree(model7, ignore_errors=True)  # 15 GB of disk back for the 72B's 41
        if builder is None and not (model72/'config.json').exists() and left() > 150: builder = build72()
        if builder:
            p, t = builder
            p.wait(timeout=max(1, left() - 60))
            results['build_72b_s'] = round(time.time() - t, 1)
            if p.returncode != 0: results['notes'].append(f'72B build failed (rc {p.returncode})')
        if (model72/'config.json').exists():
            fsdp_ta = over(max_steps=a.fsdp_steps, gradient_accumulation_steps=1, per_device_train_batch_size=1,
                           save_strategy='steps', save_steps=max(1, a.fsdp_steps - 1))
            F = leg('F', f'{m72}, 2 GPUs FSDP2, batch 1 x acc 1, max_length {a.fsdp_max_length}', 150, nproc=2, accel_cfg=ACC/'fsdp_qlora.yaml',
                    port=29513, env=fsdp_env, cfg_path=write_config(work, 'F', model72, base, fsdp_ta,
                                                                     dict(max_length=a.fsdp_max_length if not a.smoke else 256), quant72))
            if F and F['rc'] != 0 and not F['steps_done'] and left() > 200 and not a.smoke:  # retry once without HF checkpointing
                results['notes'].append('leg F failed before its first step with gradient checkpointing: retried as F2 without it')
                leg('F2', f'72B, 2 GPUs FSDP2, no gradient checkpointing, max_length {a.fsdp_max_length}', 150, nproc=2,
                    accel_cfg=ACC/'fsdp_qlora.yaml', port=29514, env=fsdp_env,
                    cfg_path=write_config(work, 'F2', model72, base, {**fsdp_ta, 'gradient_checkpointing': False}, dict(max_length=a.fsdp_max_length)))
        if not a.smoke: shutil.rmtree(work/'out', ignore_errors=True)
    save()

    lines = ['| leg | what | processes | tokens/s (all GPUs) | timed | peak GiB per GPU: load / training loop | rc | wall |', '|---|---|---|---|---|---|---|---|']
    for r in results['legs']:
        tps = f"{r['tokens_per_s']:.0f}" if r['tokens_per_s'] else '–'
        lines.append(f"| {r['leg']} | {r['what']} | {r['processes']} | {tps} | {r['timed'] or str(r['steps_done']) + ' steps done'} | "
                     f"{r['load_peak_gib']} / {r['loop_peak_gib']} | {r['rc']} | {r['wall_s']:.0f} s |")
    if 'ddp_speedup' in results: lines.append(f"\nDDP speed-up, 2 GPUs / 1 GPU, same per-GPU settings: **{results['ddp_speedup']:.2f}x** (target >= 1.8x)")
    if 'parity' in results:
        p = results['parity']
        lines.append(f"\nLoss parity, 1 GPU (acc {ga}) vs 2 GPUs (acc {ga // 2}), same global batch: max |Δloss| {p['max_abs_loss_diff']} over "
                     f"{p['steps']} steps (tolerance {p['tolerance']}): **{'PASS' if p['passed'] else 'FAIL'}**\n\n"
                     '| step | loss 1 GPU | loss 2 GPUs | grad_norm 1 GPU | grad_norm 2 GPUs |\n|---|---|---|---|---|')
        lines += [f'| {k} | {x:.5f} | {y:.5f} | {g:.5f} | {h:.5f} |' for k, x, y, g, h in p['rows']]
    for r in results['legs']:
        if r['leg'].startswith('F'):
            lines.append(f"\nLeg {r['leg']}: wrapped as {(r['wrap'] or {}).get('model')}, {(r['wrap'] or {}).get('sharded')} sharded parameters per "
                         f"process; checkpoint {r['checkpoint']}: {r['checkpoint_files']}; lora_adapter/: {r['adapter_files']}")
    lines.append('\n' + ', '.join(f'{k} {results[k]} s' for k in ('build_7b_s', 'build_72b_s') if results.get(k) is not None)
                 + f"; total {results['total_s']} s; versions {results['versions']}" + (f"; notes: {results['notes']}" if results['notes'] else ''))
    (out/'results.md').write_text('\n'.join(lines) + '\n')
    for f in work.glob('leg_*.log'):  # at most 8 files come back from the GPU machine: results.json, results.md, <= 5 logs
        if out.resolve() != work.resolve(): (out/f.name).write_bytes(f.read_bytes()[-2_000_000:])
    print('\n' + '\n'.join(lines), flush=True)
    ok = all(r['rc'] == 0 for r in results['legs']) and results.get('parity', {}).get('passed', True) and not any('FAILED' in n for n in results['notes'])
    sys.exit(0 if ok and results['legs'] else 1)

if __name__ == '__main__': main()
