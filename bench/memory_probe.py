"""Calibrate the fast path's memory model (`qlora_nb.speed.MemoryModel`) and its row-size choice on a GPU.

Trains a random-weight Qwen2.5 model (`qlora_nb.bench.bench_work`) through qlora_nb's own `setup_training` and
`Trainer.train`, on 2,048-token examples, 8 per step, while a callback changes the packed row size T and the number of
decoder layers recomputed n every few steps. Each step records the memory allocated at its start (weights, adapters,
optimizer states), its peak, its rows and its time. The per-token cost of a row is then fitted as
`(peak - start) = c + T x (row + n x kept_in + (L - n) x kept_all)`, printed beside `memory_model`'s estimate.
Since run 9 a compiled layer is recomputed selectively (`checkpoint_layers`), and the backward pass of such a layer is
a second moment the peak can fall on (`MemoryModel.backward_fixed`, `recompute_row`), which this linear fit does not
separate; the table's peaks per (T, n) are what to compare with `MemoryModel.peak` (bench/RESULTS.md, run 9).

    python bench/memory_probe.py --preset 7B --tokenizer .whl/qwen2.5-tokenizer --out $OUT    # ~4 min on an H200
    python bench/memory_probe.py --smoke                                                     # the tiny model, CPU
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
from qlora_nb.speed import GiB, checkpoint_layers, decoder_layers, memory_model  # noqa: E402
from qlora_nb.train import setup_training  # noqa: E402


def grid(L: int, smoke: bool) -> list[tuple[int, int]]:
    "(tokens per row, layers recomputed) to measure."
    if smoke: return [(256, L), (256, 0), (512, 1), (512, 0)]
    q = [L, 3 * L // 4, L // 2, L // 4, 0]
    return ([(2048, n) for n in q] + [(4096, n) for n in (L, L // 2, 0)] + [(8192, n) for n in (L, 0)]
            + [(16384, n) for n in (L, 0)])


class Probe(TrainerCallback):
    "Steps through `cells`, `reps` steps each; records each step's start memory, peak, rows and seconds."
    def __init__(self, model, collator, cells, reps):
        self.model, self.collator, self.cells, self.reps, self.log, self.rows = model, collator, cells, reps, [], []
        self.cuda = torch.cuda.is_available()

    def cell(self, step): return self.cells[min(step // self.reps, len(self.cells) - 1)]

    def hook(self, tokens):
        self.rows.append(tokens)
        checkpoint_layers(self.model, self.n)

    def on_step_begin(self, args, state, control, **kw):
        T, self.n = self.cell(state.global_step)
        self.collator.tokens_per_row = self.cell(state.global_step + 1)[0]  # the dataloader collates one batch ahead
        if self.cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated() if self.cuda else 0
        self.rows, self.t0 = [], time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.cuda: torch.cuda.synchronize()
        self.log.append({'step': state.global_step, 'n': self.n, 'rows': self.rows,
                         'tokens': sum(self.rows), 's': time.perf_counter() - self.t0, 'start': self.start,
                         'peak': torch.cuda.max_memory_allocated() if self.cuda else 0})


def fit(points, L):
    "Least squares of (peak - start) = c + T*row + T*n*kept_in + T*(L-n)*kept_all over `points` (T, n, bytes)."
    A = torch.tensor([[1.0, T, T * n, T * (L - n)] for T, n, _ in points], dtype=torch.float64)
    b = torch.tensor([float(y) for *_, y in points], dtype=torch.float64)
    return dict(zip(('c', 'row', 'kept_in', 'kept_all'), torch.linalg.lstsq(A, b).solution.tolist()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='7B')
    ap.add_argument('--tokenizer', default=str(ROOT/'data'/'tiny_qwen'))
    ap.add_argument('--out', default='probe_out')
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--smoke', action='store_true')
    a = ap.parse_args()
    preset = 'tiny' if a.smoke else a.preset
    work = Path(tempfile.gettempdir())/'qlora_nb_probe'
    model_dir, _ = bench_work(preset, work, a.tokenizer, ROOT/'data'/'novel_finetuning_dataset.jsonl', a.smoke)
    L0 = json.loads((model_dir/'qlora_nb_bench_shape.json').read_text())['num_hidden_layers']
    cells = grid(L0, a.smoke)
    over = ['training.checkpointing=auto' if torch.cuda.is_available() else 'training.checkpointing=all',
            'training.tokens_per_row=16384', f'training_args.max_steps={len(cells) * a.reps}']
    config = load_config(work/'bench.yaml', over)
    tok = load_tokenizer(config)
    exs = synthetic_examples([256 if a.smoke else 2048] * 8 * len(cells) * a.reps, tok)
    trainer, plan = setup_training(config, tok, exs)
    model = trainer.model
    L = len(decoder_layers(model))
    assert L == L0, (L, L0)
    probe = Probe(model, trainer.data_collator, cells, a.reps)
    trainer.data_collator.tokens_per_row = cells[0][0]
    trainer.row_hook = probe.hook
    trainer.add_callback(probe)
    held = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    trainer.train()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    # keep steps after the first of each cell whose rows all have the cell's size
    kept = {}
    for r in probe.log:
        T, n = probe.cell(r['step'] - 1)
        if (r['step'] - 1) % a.reps == 0 or r['n'] != n or not r['rows']: continue
        if any(abs(t - T) > 64 for t in r['rows']): continue
        kept.setdefault((T, n), []).append(r)
    table, points = [], []
    for (T, n), rs in sorted(kept.items()):
        extra = max(r['peak'] - r['start'] for r in rs)
        tps = statistics.median(r['tokens'] / r['s'] for r in rs)
        points.append((T, n, extra))
        table.append({'T': T, 'n': n, 'steps': len(rs), 'start_gib': round(rs[0]['start'] / GiB, 2),
                      'peak_gib': round(max(r['peak'] for r in rs) / GiB, 2), 'extra_gib': round(extra / GiB, 2),
                      'tokens_per_s': round(tps)})
    mm = memory_model(model, config, 24.0)
    f = fit(points, L) if len(points) >= 4 and torch.cuda.is_available() else {}
    res = {'preset': preset, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
           'held_after_setup_gib': round(held / GiB, 2), 'plan': plan.summary(), 'table': table,
           'fit_bytes_per_token': {k: round(v) for k, v in f.items()},
           'model_bytes_per_token': {'fixed_gib': round(mm.fixed / GiB, 2), 'row': round(mm.row),
                                     'kept_in': round(mm.kept_in), 'kept_all': round(mm.kept_all)},
           'log': probe.log}
    (out/'probe.json').write_text(json.dumps(res, indent=1))
    print(f"held after setup {res['held_after_setup_gib']} GiB; plan: {res['plan']}")
    print('| T | n | steps | start GiB | peak GiB | extra GiB | tokens/s |\n|---|---|---|---|---|---|---|')
    for t in table: print(f"| {t['T']} | {t['n']} | {t['steps']} | {t['start_gib']} | {t['peak_gib']} | {t['extra_gib']} | "
                          f"{t['tokens_per_s']} |")
    print('fit (bytes; per token but c):', res['fit_bytes_per_token'])
    print('memory_model (budget 24 GiB):', res['model_bytes_per_token'])


if __name__ == '__main__':
    main()
