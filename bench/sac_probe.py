"""Selective recomputation of compiled decoder layers against whole-layer recomputation, and the host link, on a GPU.

Trains a random-weight Qwen2.5 model through qlora_nb's `setup_training` on 2,048-token examples, 8 per step, while a
callback switches the packed row size T, the loss chunk and how the decoder layers are recomputed: `full`
(transformers' own checkpointing of each layer: with transformers 5.17, around the compiled call, so the whole layer
runs again in the backward pass; newer versions checkpoint inside it), `selective`
(`qlora_nb.speed.checkpoint_layers`: inside the compiled call, attention's output kept), `none`. Prints tokens/s and
peak memory per cell, and times pinned host<->GPU copies alone and beside matmuls (what `Offload` relies on).

    python bench/sac_probe.py --preset 7B --tokenizer .whl/qwen2.5-tokenizer --out $OUT     # ~2 min on an H200
"""
import argparse, json, statistics, sys, tempfile, time
from pathlib import Path
import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qlora_nb.bench import bench_work, synthetic_examples  # noqa: E402
from qlora_nb.config import load_config  # noqa: E402
from qlora_nb.model import load_tokenizer  # noqa: E402
from qlora_nb.speed import GiB, checkpoint_layers, decoder_layers  # noqa: E402
from qlora_nb.train import setup_training  # noqa: E402

def set_mode(model, mode):
    "full: transformers' own checkpointing of each layer (the old way); selective: `checkpoint_layers`; none."
    L = len(decoder_layers(model))
    checkpoint_layers(model, L if mode == 'selective' else 0)
    if mode == 'full':
        for layer in decoder_layers(model): layer.gradient_checkpointing = True

def link(out):
    "Pinned host<->GPU copy rates (GB/s), alone and while the default stream runs matmuls."
    n = 2**29  # 1 GiB of bf16
    g = torch.empty(n, dtype=torch.bfloat16, device='cuda'); h = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
    side, res = torch.cuda.Stream(), {}
    for _ in range(3): a @ a  # warm up cuBLAS, or the first matmul rate reads low
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
    g = h = a = None; torch.cuda.empty_cache()
    return res

class Probe(TrainerCallback):
    "Steps through `cells` (T, mode, loss chunk), `reps` steps each; records each step's time and memory."
    def __init__(self, model, collator, cells, reps):
        self.model, self.collator, self.cells, self.reps, self.log = model, collator, cells, reps, []
        self.mode, self.chunk = None, 1024
    def cell(self, step): return self.cells[min(step // self.reps, len(self.cells) - 1)]
    def hook(self, tokens): pass
    def on_step_begin(self, args, state, control, **kw):
        T, mode, chunk = self.cell(state.global_step)
        if mode != self.mode: set_mode(self.model, mode); self.mode = mode
        if chunk != self.chunk:
            from qlora_nb.speed import _causal_lm, use_chunked_loss
            vars(_causal_lm(self.model)).pop('forward', None); use_chunked_loss(self.model, chunk); self.chunk = chunk
        self.collator.tokens_per_row = self.cell(state.global_step + 1)[0]
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        self.start, self.t0 = torch.cuda.memory_allocated(), time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.log.append({'step': state.global_step, 'cell': self.cell(state.global_step - 1),
                         's': time.perf_counter() - self.t0, 'start': self.start,
                         'peak': torch.cuda.max_memory_allocated(), 'reserved': torch.cuda.max_memory_reserved()})

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='7B'); ap.add_argument('--tokenizer', required=True)
    ap.add_argument('--out', default='sac_out'); ap.add_argument('--reps', type=int, default=4)
    ap.add_argument('--cells', help='T:mode[:loss chunk], ...',
                    default='4096:full,8192:full,16384:full,4096:selective,8192:selective,8192:selective:256,'
                            '16384:selective,16384:none')
    ap.add_argument('--no-link', action='store_true')
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    res = {} if a.no_link else {'link': link(out)}; print('link', res.get('link'), flush=True)
    work = Path(tempfile.gettempdir())/'qlora_nb_sac'
    model_dir, _ = bench_work(a.preset, work, a.tokenizer, ROOT/'data'/'novel_finetuning_dataset.jsonl')
    cells = [(int(c.split(':')[0]), c.split(':')[1], int((c.split(':') + ['1024'])[2])) for c in a.cells.split(',')]
    over = ['training.checkpointing=auto', 'training.tokens_per_row=16384',
            f'training_args.max_steps={len(cells) * a.reps}']
    config = load_config(work/'bench.yaml', over)
    tok = load_tokenizer(config)
    exs = synthetic_examples([2048] * 8 * len(cells) * a.reps, tok)
    trainer, plan = setup_training(config, tok, exs)
    model = trainer.model
    probe = Probe(model, trainer.data_collator, cells, a.reps)
    trainer.data_collator.tokens_per_row = cells[0][0]
    trainer.row_hook, trainer.forward_context = probe.hook, None
    trainer.add_callback(probe)
    t0 = time.time()
    try: trainer.train()
    except Exception as e: res['error'] = f'{type(e).__name__}: {str(e)[:2000]}'; print(res['error'])
    res['train_s'] = round(time.time() - t0, 1)
    table = []
    for cell in cells:
        rs = [r for r in probe.log if tuple(r['cell']) == cell][2:]  # the first two may compile
        if not rs: continue
        s = statistics.median(r['s'] for r in rs)
        table.append({'T': cell[0], 'mode': cell[1], 'chunk': cell[2], 'steps': len(rs),
                      'tokens_per_s': round(16384 / s),
                      'start_gib': round(rs[0]['start'] / GiB, 2),
                      'peak_gib': round(max(r['peak'] for r in rs) / GiB, 2),
                      'reserved_gib': round(max(r['reserved'] for r in rs) / GiB, 2),
                      'step_s': [round(r['s'], 3) for r in rs]})
    res.update(table=table, log=probe.log, plan=plan.summary())
    (out/'sac_probe.json').write_text(json.dumps(res, indent=1))
    print('| T | mode | chunk | tokens/s | start GiB | peak GiB | reserved GiB | steps s |')
    for t in table:
        print(f"| {t['T']} | {t['mode']} | {t['chunk']} | {t['tokens_per_s']} | {t['start_gib']} | {t['peak_gib']} | "
              f"{t['reserved_gib']} | {t['step_s']} |")

if __name__ == '__main__':
    main()
