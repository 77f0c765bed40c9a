"""Measure selective recomputation (SAC) of compiled decoder layers against full recomputation, and the host link.

Trains a random-weight Qwen2.5 model through qlora_nb's `setup_training` on 2,048-token examples, 8 per step, while a
callback switches the packed row size T and how the decoder layers are recomputed: `full` (the whole layer in the
backward pass), `sac` (inside the compiled layer: keep the outputs of the matmuls no wider than the hidden size and of
attention, recompute the rest), `none`. Also times pinned host<->GPU copies, alone and beside matmuls.

    python bench/sac_probe.py --preset 7B --tokenizer .whl/qwen2.5-tokenizer --out $OUT
"""
import argparse, functools, json, statistics, sys, tempfile, time, types
from pathlib import Path
import torch
from transformers import TrainerCallback
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, CheckpointPolicy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qlora_nb.bench import bench_work, synthetic_examples  # noqa: E402
from qlora_nb.config import load_config  # noqa: E402
from qlora_nb.model import load_tokenizer  # noqa: E402
from qlora_nb.speed import GiB, checkpoint_layers, decoder_layers  # noqa: E402
from qlora_nb.train import setup_training  # noqa: E402

SEEN = {}

def make_policy(hidden, save=True, gemm=False):
    "save: attention and the adapters' narrow products; gemm: also the 4-bit products no wider than `hidden`."
    def policy(ctx, op, *args, **kw):
        name = str(op)
        if not save: SEEN.setdefault(name, 'recompute'); return CheckpointPolicy.PREFER_RECOMPUTE
        if name.startswith('bitsandbytes.gemm_4bit'):
            out = int(args[2][0])
            SEEN[f'{name} out {out}'] = 'save' if gemm and out <= hidden else 'recompute'
            return CheckpointPolicy.MUST_SAVE if gemm and out <= hidden else CheckpointPolicy.PREFER_RECOMPUTE
        if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = (args[0], args[1]) if op is torch.ops.aten.mm.default else (args[1], args[2])
            key = f'{name} {tuple(a.shape)}x{tuple(b.shape)}'
            if a.shape[-1] > 64 and b.shape[-1] <= hidden:
                SEEN[key] = 'save'; return CheckpointPolicy.MUST_SAVE
            SEEN[key] = 'recompute'; return CheckpointPolicy.PREFER_RECOMPUTE
        if 'varlen' in name or 'flash' in name or 'scaled_dot' in name:
            SEEN[name] = 'save'; return CheckpointPolicy.MUST_SAVE
        SEEN.setdefault(name, 'recompute')
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy

def sac_forward(ctx_fn, self, *args, **kw):
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, context_fn=ctx_fn, **kw)

def set_mode(model, mode, ctx_fns):
    fwd = functools.partial(sac_forward, ctx_fns[mode]) if mode in ctx_fns else None  # one object: one compile
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = mode == 'full'
        if fwd: layer.forward = types.MethodType(fwd, layer)
        else: vars(layer).pop('forward', None)

def link(out):
    "Pinned host<->GPU copy rates (GB/s), alone and while the default stream runs matmuls."
    n = 2**29  # 1 GiB of bf16
    g = torch.empty(n, dtype=torch.bfloat16, device='cuda'); h = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    res = {}
    for name, fn in (('d2h', lambda: h.copy_(g, non_blocking=True)), ('h2d', lambda: g.copy_(h, non_blocking=True))):
        fn(); torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4): fn()
        torch.cuda.synchronize(); res[name] = round(4 * 2 * n / (time.perf_counter() - t) / 1e9, 1)
        with torch.cuda.stream(side):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(4): fn()
            e1.record()
        m0, m1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        m0.record()
        for _ in range(40): a @ a
        m1.record(); torch.cuda.synchronize()
        res[name + '_beside_matmul'] = round(4 * 2 * n / (e0.elapsed_time(e1) / 1e3) / 1e9, 1)
        res[name + '_matmul_tflops'] = round(40 * 2 * 8192**3 / (m0.elapsed_time(m1) / 1e3) / 1e12)
    del g, h, a; torch.cuda.empty_cache()
    return res

class Probe(TrainerCallback):
    def __init__(self, model, collator, cells, reps, ctx_fns):
        self.model, self.collator, self.cells, self.reps, self.ctx_fns, self.log = model, collator, cells, reps, ctx_fns, []
        self.mode, self.chunk = None, 1024
    def cell(self, step): return self.cells[min(step // self.reps, len(self.cells) - 1)]
    def hook(self, tokens): pass
    def on_step_begin(self, args, state, control, **kw):
        T, mode, chunk = self.cell(state.global_step)
        if mode != self.mode: set_mode(self.model, mode, self.ctx_fns); self.mode = mode
        if chunk != self.chunk:
            from qlora_nb.speed import _causal_lm, use_chunked_loss
            vars(_causal_lm(self.model)).pop('forward', None); use_chunked_loss(self.model, chunk); self.chunk = chunk
        self.collator.tokens_per_row = self.cell(state.global_step + 1)[0]
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        self.start, self.t0 = torch.cuda.memory_allocated(), time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.log.append({'step': state.global_step, 'cell': self.cell(state.global_step - 1), 's': time.perf_counter() - self.t0,
                         'start': self.start, 'peak': torch.cuda.max_memory_allocated(),
                         'reserved': torch.cuda.max_memory_reserved()})

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='7B'); ap.add_argument('--tokenizer', required=True)
    ap.add_argument('--out', default='sac_out'); ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--cells', default='8192:full,8192:sac0,16384:sac0,4096:sac0,8192:sac0:256,8192:sac,8192:sac:256,'
                                       '8192:sacq:256,16384:sacq')
    ap.add_argument('--no-link', action='store_true')
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    res = {} if a.no_link else {'link': link(out)}; print('link', res.get('link'), flush=True)
    work = Path(tempfile.gettempdir())/'qlora_nb_sac'
    model_dir, _ = bench_work(a.preset, work, a.tokenizer, ROOT/'data'/'novel_finetuning_dataset.jsonl')
    cells = [(int(c.split(':')[0]), c.split(':')[1], int((c.split(':') + ['1024'])[2])) for c in a.cells.split(',')]
    over = ['training.checkpointing=auto', 'training.tokens_per_row=16384', f'training_args.max_steps={len(cells) * a.reps}']
    config = load_config(work/'bench.yaml', over)
    tok = load_tokenizer(config)
    exs = synthetic_examples([2048] * 8 * len(cells) * a.reps, tok)
    trainer, plan = setup_training(config, tok, exs)
    model = trainer.model
    hidden = model.config.get_text_config().hidden_size
    ctx_fns = {m: functools.partial(create_selective_checkpoint_contexts, make_policy(hidden, **kw)) for m, kw in
               {'sac': {}, 'sac0': {'save': False}, 'sacq': {'gemm': True}}.items()}
    probe = Probe(model, trainer.data_collator, cells, a.reps, ctx_fns)
    trainer.data_collator.tokens_per_row = cells[0][0]
    trainer.row_hook = probe.hook
    trainer.add_callback(probe)
    t0 = time.time()
    try: trainer.train()
    except Exception as e: res['error'] = f'{type(e).__name__}: {str(e)[:2000]}'; print(res['error'])
    res['train_s'] = round(time.time() - t0, 1)
    table = []
    for cell in cells:
        rs = [r for r in probe.log if tuple(r['cell']) == cell][1:]
        if not rs: continue
        s = statistics.median(r['s'] for r in rs)
        table.append({'T': cell[0], 'mode': cell[1], 'chunk': cell[2], 'steps': len(rs), 'tokens_per_s': round(16384 / s),
                      'start_gib': round(rs[0]['start'] / GiB, 2), 'peak_gib': round(max(r['peak'] for r in rs) / GiB, 2),
                      'reserved_gib': round(max(r['reserved'] for r in rs) / GiB, 2), 'step_s': [round(r['s'], 3) for r in rs]})
    res.update(table=table, log=probe.log, policy=SEEN, plan=plan.summary())
    (out/'sac_probe.json').write_text(json.dumps(res, indent=1))
    print('| T | mode | chunk | tokens/s | start GiB | peak GiB | reserved GiB | steps s |')
    for t in table: print(f"| {t['T']} | {t['mode']} | {t['chunk']} | {t['tokens_per_s']} | {t['start_gib']} | {t['peak_gib']} | {t['reserved_gib']} | {t['step_s']} |")
    print('policy:', json.dumps(SEEN, indent=0)[:3000])

if __name__ == '__main__':
    main()
