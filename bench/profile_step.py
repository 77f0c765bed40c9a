"""Where a training step's time goes on a GPU: qlora_nb's own path (`setup_training`, `Trainer.train`) under
`torch.profiler`, for benchmark rows such as `fast-24GiB@lognormal`.

For each row it trains `--warmup` steps, profiles `--steps` more, and reports from the trace: the steps' wall time,
the time the GPU was busy (the union of kernels and copies), the idle gaps in the GPU's timeline and which host op was
launching when each long gap ended, the host time in CUDA runtime calls (launches, synchronizations, copies) and the
top-level host ops. Nothing is changed in qlora_nb; this only reads. To time each step it synchronises at the step's
start and end, so the GPU's idle time between steps is partly its own doing (`qlora_nb_bench` times with CUDA events).

    python bench/profile_step.py --preset 7B --tokenizer .whl/qwen2.5-tokenizer --out $OUT/profile
    python bench/profile_step.py --smoke        # the tiny model on the CPU: checks the script itself
"""
import argparse, bisect, collections, gzip, json, sys, tempfile, time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qlora_nb.bench import SETUPS, bench_work, parse_row, workload_examples  # noqa: E402
from qlora_nb.config import load_config  # noqa: E402
from qlora_nb.model import free_memory, load_tokenizer  # noqa: E402
from qlora_nb.train import setup_training  # noqa: E402

GPU_CATS = ('kernel', 'gpu_memcpy', 'gpu_memset')


class Profile(TrainerCallback):
    "Profile steps warmup+1 .. warmup+steps; keep the wall time of each."
    def __init__(self, warmup, steps, cuda):
        self.warmup, self.steps, self.cuda, self.walls, self.prof = warmup, steps, cuda, [], None

    def sync(self):
        if self.cuda: torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            self.sync()
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        self.sync(); self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.sync()
        if self.prof is not None: self.walls.append(time.perf_counter() - self.t0)
        if self.prof is not None and state.global_step == self.warmup + self.steps:
            self.prof.__exit__(None, None, None)
            control.should_training_stop = True


def union(intervals):
    "Total length of the union of (start, end) intervals, and the gaps between them (start, end)."
    total, gaps, end = 0.0, [], None
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None: gaps.append((end, a))
            total += b - a; end = b
        elif b > end: total += b - end; end = b
    return total, gaps


def analyze(trace: dict, n_steps: int, top: int = 12) -> dict:
    "Summary of a chrome trace from `torch.profiler` (times in ms)."
    ev = [e for e in trace.get('traceEvents', []) if e.get('ph') == 'X' and 'dur' in e]
    gpu = [e for e in ev if e.get('cat') in GPU_CATS]
    rt = [e for e in ev if e.get('cat') == 'cuda_runtime']
    ops = [e for e in ev if e.get('cat') in ('cpu_op', 'user_annotation')]
    out = {'kernels_per_step': round(sum(e.get('cat') == 'kernel' for e in gpu) / n_steps)}
    # top-level host ops per thread: not inside another op of the same thread
    by_tid = collections.defaultdict(list)
    for e in ops: by_tid[e['tid']].append(e)
    tops = collections.Counter()
    for tid, es in by_tid.items():
        es.sort(key=lambda e: (e['ts'], -e['dur']))
        end = -1
        for e in es:
            if e['ts'] >= end: end = e['ts'] + e['dur']; tops[(tid, e['name'])] += e['dur']
    out['host_top_ops_ms'] = [[f'{name} (thread {tid})', round(us / 1e3 / n_steps, 2)]
                              for (tid, name), us in tops.most_common(top)]
    calls = collections.defaultdict(lambda: [0, 0.0])
    for e in rt: calls[e['name']][0] += 1; calls[e['name']][1] += e['dur']
    out['runtime_calls_per_step'] = {k: [round(n / n_steps), round(us / 1e3 / n_steps, 2)]
                                     for k, (n, us) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:top]}
    if not gpu: return out
    busy, gaps = union([(e['ts'], e['ts'] + e['dur']) for e in gpu])
    span = max(e['ts'] + e['dur'] for e in gpu) - min(e['ts'] for e in gpu)
    out.update(gpu_span_ms_per_step=round(span / 1e3 / n_steps, 1), gpu_busy_ms_per_step=round(busy / 1e3 / n_steps, 1))
    out['gpu_idle_gaps_per_step'] = {f'>{t} us': [round(sum(b - a > t for a, b in gaps) / n_steps, 1),
                                                  round(sum(b - a for a, b in gaps if b - a > t) / 1e3 / n_steps, 1)]
                                     for t in (10, 100, 1000)}
    kt = collections.defaultdict(float)
    for e in gpu: kt[e['name'][:90]] += e['dur']
    out['gpu_top_kernels_ms'] = [[k, round(v / 1e3 / n_steps, 2)]
                                 for k, v in sorted(kt.items(), key=lambda kv: -kv[1])[:top]]
    # long gaps: what the host was running when the kernel that ended the gap was launched
    launch = {e['args'].get('correlation'): e for e in rt if 'args' in e}
    starts = sorted((e['ts'], e) for e in gpu)
    keys = [s for s, _ in starts]
    inner = {tid: sorted(es, key=lambda e: e['ts']) for tid, es in by_tid.items()}
    def host_op(r):
        es = inner.get(r['tid'], [])
        i = bisect.bisect_right([e['ts'] for e in es], r['ts'])
        names = [e['name'] for e in es[max(0, i - 400):i] if e['ts'] + e['dur'] >= r['ts']]
        return ' > '.join(names[:2] + (['...'] if len(names) > 3 else []) + names[-1:]) if names else '?'
    why = collections.defaultdict(lambda: [0, 0.0])
    for a, b in gaps:
        if b - a < 100: continue
        e = starts[bisect.bisect_left(keys, b)][1]
        r = launch.get((e.get('args') or {}).get('correlation'))
        key = host_op(r) if r else '?'
        why[key][0] += 1; why[key][1] += b - a
    out['gaps_over_100us_by_launching_host_op'] = [[k, n, round(us / 1e3 / n_steps, 2)] for k, (n, us) in
                                                   sorted(why.items(), key=lambda kv: -kv[1][1])[:top]]
    return out


def annotate(obj, attr, label):
    "Wrap `obj.attr` in `torch.profiler.record_function(label)` so the trace shows the phase."
    fn = getattr(obj, attr)
    def wrapped(*args, **kw):
        with torch.profiler.record_function(label): return fn(*args, **kw)
    setattr(obj, attr, wrapped)


def profile_row(name, work, warmup, steps, out) -> dict:
    setup, workload = parse_row(name)
    config = load_config(work/'bench.yaml', [*SETUPS[setup][0], f'output_dir={work}/rows/{setup}',
                                             f'training_args.max_steps={warmup + steps + 1}'])
    tok = load_tokenizer(config)
    exs = workload_examples(workload, config, tok, smoke=not torch.cuda.is_available())
    free_memory()
    trainer, plan = setup_training(config, tok, exs)
    for obj, attr in ((trainer, 'compute_loss'), (trainer.accelerator, 'backward'), (trainer, '_prepare_inputs'),
                      (trainer, 'get_batch_samples'), (trainer, '_maybe_log_save_evaluate')):
        annotate(obj, attr, f'qlora::{attr}')
    cb = Profile(warmup, steps, torch.cuda.is_available())
    trainer.add_callback(cb)
    try: trainer.train()
    finally:
        while plan.undo: plan.undo.pop()()
    path = Path(tempfile.gettempdir())/f'trace-{name.replace("@", "-")}.json'
    cb.prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    with gzip.open(out/f'trace-{name.replace("@", "-")}.json.gz', 'wt') as f: json.dump(trace, f)
    import torch._dynamo.utils as du
    dyn = {k: dict(v) for k, v in du.counters.items() if k in ('stats', 'graph_break', 'recompiles') and v}
    res = {'row': name, 'plan': plan.summary(), 'notes': plan.notes, 'dynamo_counters': dyn,
           'step_wall_ms': [round(w * 1e3, 1) for w in cb.walls], **analyze(trace, len(cb.walls))}
    del trainer; free_memory()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='7B')
    ap.add_argument('--tokenizer', default=str(ROOT/'data'/'tiny_qwen'))
    ap.add_argument('--rows', default='fast-24GiB@lognormal,fast-12GiB@fixed,fast@fixed')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--steps', type=int, default=2)
    ap.add_argument('--out', default='profile_out')
    ap.add_argument('--smoke', action='store_true')
    a = ap.parse_args()
    preset = 'tiny' if a.smoke else a.preset
    work, out = Path(tempfile.gettempdir())/'qlora_nb_profile', Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bench_work(preset, work, a.tokenizer, ROOT/'data'/'novel_finetuning_dataset.jsonl', a.smoke)
    results = []
    for name in a.rows.split(','):
        r = profile_row(name, work, a.warmup, a.steps, out)
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
        (out/'profile.json').write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
