"""Data at scale (issue 12): validate and encode N generated records, cold and with the cache warm; records/s, peak RSS.

    python bench/data_scale.py --n 100000                       # scan, encode cold/warm, validate warm; Qwen2.5, all cores
    python bench/data_scale.py --n 100000 --phases train_cold_tiny,train_warm_tiny --steps 20
    python bench/data_scale.py --n 1000000 --phases scan,encode_cold,encode_warm,validate_warm
    python bench/data_scale.py --n 2000 --phases scan,encode_cold,encode_warm --tokenizer data/tiny_qwen   # smoke test

The records come from bench/make_data.py (deterministic; written once to --out, ~1.8 KB a record). Each phase runs in a
child process; this script samples the resident memory of that process and of all its children (the encoding
processes) every 50 ms and reports the peak of the sum (an upper bound: pages the forked processes share with the parent
are counted in each) and of the main process alone; CPU time is that of the child and all its children.
Phases:
  scan             the streaming validation pass alone (`qlora_nb.sources.scan_data`): no tokenizer, no torch
  encode_cold      `qlora_nb.examples.encoded` with an empty cache: scan, then encode with --num-proc processes into Arrow
  encode_warm      the same call again: from the cache
  validate_warm    what qlora_nb_validate does for the data (statistics, split, reports, audit), cache warm
  train_cold_tiny  `train()` of the tiny model on the records (its tokenizer, config_test.yaml, eval off), cache empty
  train_warm_tiny  the same with the cache warm; the first step's end is timed from the process start
Rows are appended to <out>/results.jsonl and printed as a Markdown table; per-chunk encoding times go to
<out>/chunks-<n>.jsonl. "load" is the 1-minute load average before and after a phase (above the core count: other
processes shared the machine, and wall times are longer than the work).
"""
from __future__ import annotations
import argparse, json, os, platform, resource, shutil, subprocess, sys, threading, time
from pathlib import Path

START = time.time()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
QWEN = Path(os.environ.get('QLORA_NB_QWEN_TOKENIZER', ROOT.parent/'shared'/'reference'/'qwen2.5-tokenizer'))

def validate_data(config_path, overrides, num_proc=None) -> object:
    "The data part of qlora_nb_validate on the cached path (what 09_cli's validate prints after the config lines)."
    from qlora_nb.config import load_config
    from qlora_nb.stats import format_stats
    from qlora_nb.examples import check_data, encoded, examples
    from qlora_nb.model import load_tokenizer
    cfg = load_config(config_path, overrides)
    d = cfg.data
    checked = check_data(cfg.dataset_path, d.default_system, d.cache_dir)
    tok = load_tokenizer(cfg)
    enc = encoded(cfg.dataset_path, tok, d.max_length, d.truncation, d.default_system, cache_dir=d.cache_dir, num_proc=num_proc,
                  checked=checked)
    print(f'dataset        {cfg.dataset_path}: {enc.n_records} records, all valid')
    print(format_stats(enc.stats(d.max_length)))
    reports = {split: examples(cfg, tok, split, num_proc=num_proc)[1] for split in ('train', 'eval')}
    print(f"split          {reports['train'].n_records} train, {reports['eval'].n_records} eval")
    for split, report in reports.items():
        print(f'encoding       {split}: {report}')
        if a := report.audit:
            print(f"audit          {split} ok: {a['examples']} examples, {a['trained_tokens']} of {a['tokens']} tokens trained")
    print(f"cache          {enc.entry} ({'reused' if enc.warm else 'built'} in {enc.seconds:.1f} s)")
    return enc

# ----------------------------------------------------------------------------------------------------------------------
# One phase, in a child process

def phase(name, args) -> dict:
    t0, out = time.time(), {}
    from qlora_nb import sources as D  # no torch, no tokenizer
    if name == 'scan':
        sc = D.scan_data(args.data)
        sc.raise_problems()
        out.update(records=sc.n_records, seconds=time.time() - t0)
    elif name in ('encode_cold', 'encode_warm'):
        from transformers import AutoTokenizer
        from qlora_nb import cache as C
        from qlora_nb import examples as E
        tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
        t1, build_s = time.time(), {}
        build, chunk, log = E.build_entry, C._encode_chunk, args.out/f'chunks-{args.n}.jsonl'
        def timed_chunk(batch, tokenizer, settings, report_dir):  # runs in the encoding processes
            s, c = time.time(), time.process_time()
            r = chunk(batch, tokenizer, settings, report_dir)
            with open(log, 'a') as f:
                f.write(json.dumps({'pid': os.getpid(), 'first': batch['first'][0], 'n': batch['end'][0] - batch['first'][0],
                                    'wall': time.time() - s, 'cpu': time.process_time() - c, 'load': os.getloadavg()[0]}) + '\n')
            return r
        def timed_build(*a, **k):
            s = time.time(); r = build(*a, **k); build_s['s'] = time.time() - s; return r
        if name == 'encode_cold': log.unlink(missing_ok=True); C._encode_chunk = timed_chunk
        E.build_entry = timed_build
        from qlora_nb.config import DEFAULT_SYSTEM  # what config_test.yaml (validate_warm) uses
        enc = E.encoded(args.data, tok, args.max_length, 'truncate', DEFAULT_SYSTEM, cache_dir=args.cache, num_proc=args.num_proc)
        assert enc.warm == (name == 'encode_warm'), f'{name}: warm={enc.warm}'
        if name == 'encode_cold' and log.is_file():
            rows = [json.loads(l) for l in log.read_text().splitlines()]
            n, busy = sum(r['n'] for r in rows), {}
            for r in rows: busy[r['pid']] = busy.get(r['pid'], 0) + r['wall']
            out.update(chunk_cpu_ms=1000 * sum(r['cpu'] for r in rows) / n, chunk_wall_ms=1000 * sum(r['wall'] for r in rows) / n,
                       processes=len(busy), cpu_bound_records_per_s=len(busy) * n / sum(r['cpu'] for r in rows))
        out.update(records=enc.n_records, examples=len(enc.dataset), seconds=time.time() - t1, encode_s=build_s.get('s'),
                   tokenizer_load_s=t1 - t0, cache_bytes=sum(f.stat().st_size for f in enc.entry.rglob('*') if f.is_file()))
    elif name == 'validate_warm':
        enc = validate_data(str(args.config), [f'dataset_path={args.data}', f'model_name_or_path={args.tokenizer}',
                                              f'data.max_length={args.max_length}', f'data.cache_dir={args.cache}'], args.num_proc)
        assert enc.warm, 'validate_warm: the cache was not warm'
        out.update(records=enc.n_records, seconds=time.time() - t0)
    elif name in ('train_cold_tiny', 'train_warm_tiny'):
        import transformers
        from qlora_nb import train as T
        from qlora_nb.metrics import METRICS, read_metrics
        from qlora_nb.config import load_config
        cfg = load_config(str(args.config), [f'dataset_path={args.data}', f'output_dir={args.workdir}/run', f'data.cache_dir={args.cache}-tiny',
                                              'training_args.eval_strategy=no', 'training_args.save_steps=100000',
                                              'training_args.logging_steps=1', f'training_args.max_steps={args.steps}',
                                              'training_args.report_to=none'])
        first, examples = {'examples_s': 0.0}, T.examples
        class First(transformers.TrainerCallback):
            def on_step_end(self, a, state, control, **kw): first.setdefault('step', time.time() - START)
        def timed_examples(*a, **k):
            s = time.time(); r = examples(*a, **k); first['examples_s'] += time.time() - s; return r
        T.examples = timed_examples
        r = T.train(cfg, overwrite=True, callbacks=[First()])
        rows = read_metrics(Path(cfg.output_dir)/METRICS)
        out.update(seconds=time.time() - t0, first_step_s=first.get('step'), steps=r.metrics['steps'], examples_s=first['examples_s'],
                   reused=r.examples['train'].data['reused'], first_losses=[x['loss'] for x in rows if 'loss' in x][:5])
    else: raise SystemExit(f'unknown phase {name}')
    if out.get('records'): out['records_per_s'] = out['records'] / (out.get('encode_s') or out['seconds'])
    return out

# ----------------------------------------------------------------------------------------------------------------------
# The driver: one child process per phase, its memory sampled from outside

def run_phase(name, args) -> dict:
    import psutil
    cmd = [sys.executable, __file__, '--child', name] + sys.argv[1:]
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_DISABLE_PROGRESS_BARS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    t0, ru0, load0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc, peak, err = psutil.Process(p.pid), {'tree': 0, 'main': 0}, []
    threading.Thread(target=lambda: err.extend(p.stderr), daemon=True).start()
    def sample():
        while p.poll() is None:
            try:
                main = proc.memory_info().rss
                tree = main + sum(c.memory_info().rss for c in proc.children(recursive=True))
                peak['main'], peak['tree'] = max(peak['main'], main), max(peak['tree'], tree)
            except psutil.Error: pass
            time.sleep(0.05)
    th = threading.Thread(target=sample, daemon=True); th.start()
    stdout = p.stdout.read(); p.wait(); th.join()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = next((json.loads(l[7:]) for l in stdout.splitlines() if l.startswith('RESULT ')), None)
    if res is None or p.returncode:
        sys.stderr.write(stdout[-3000:] + ''.join(err)[-5000:])
        raise SystemExit(f'phase {name} failed (exit {p.returncode})')
    return res | dict(phase=name, n=args.n, wall_s=time.time() - t0, cpu_s=(ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
                      load=f'{load0:.1f}/{os.getloadavg()[0]:.1f}', peak_rss_tree_gib=peak['tree'] / 2**30, peak_rss_main_gib=peak['main'] / 2**30,
                      num_proc=args.num_proc, tokenizer='data/tiny_qwen' if 'tiny' in name else str(args.tokenizer),
                      machine=f'{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB', python=platform.python_version(),
                      command=' '.join(['python', 'bench/data_scale.py', *sys.argv[1:]]), time=time.strftime('%Y-%m-%d %H:%M'))

def table(rows) -> str:
    out = ['| phase | records | wall s | CPU s | records/s | peak RSS all / main (GiB) | load | notes |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        notes = []
        if r.get('encode_s'): notes.append(f"encode {r['encode_s']:.1f} s, cache {r['cache_bytes'] / 2**30:.2f} GiB, {r['examples']:,} examples")
        if r.get('chunk_cpu_ms'):
            notes.append(f"{r['chunk_cpu_ms']:.2f} ms CPU a record in {r['processes']} processes: "
                         f"{r['cpu_bound_records_per_s']:,.0f} records/s when each has a core")
        if r.get('first_step_s') is not None:
            notes.append(f"first step ends {r['first_step_s']:.1f} s after start (examples() {r['examples_s']:.1f} s, cache "
                         f"{'reused' if r['reused'] else 'built'}); losses {[round(x, 4) for x in r['first_losses']]}")
        if r['phase'] == 'encode_warm': notes.append('nothing encoded')
        rps = f"{r['records_per_s']:,.0f}" if r.get('records_per_s') else '-'
        out.append(f"| {r['phase']} | {r['n']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} | {rps} | {r['peak_rss_tree_gib']:.2f} / "
                   f"{r['peak_rss_main_gib']:.2f} | {r['load']} | {'; '.join(notes)} |")
    return '\n'.join(out)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=100_000, help='records to generate')
    ap.add_argument('--out', type=Path, default=ROOT/'output'/'data_scale', help='the data, the caches, results.jsonl')
    ap.add_argument('--phases', default='scan,encode_cold,encode_warm,validate_warm')
    ap.add_argument('--tokenizer', type=Path, default=QWEN, help='for encode_* and validate_warm (default: the Qwen2.5 tokenizer)')
    ap.add_argument('--config', type=Path, default=ROOT/'config_test.yaml')
    ap.add_argument('--num-proc', type=int, default=os.cpu_count())
    ap.add_argument('--max-length', type=int, default=1024)
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--keep-cache', action='store_true', help='do not empty the cache before encode_cold and train_cold_tiny')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = args.out.resolve()
    if not args.child and not (args.tokenizer/'tokenizer_config.json').is_file() and any(not p.endswith('tiny') for p in args.phases.split(',')):
        raise SystemExit(f'{args.tokenizer}: no tokenizer there; give --tokenizer (a folder with the Qwen2.5 tokenizer files) '
                         'or set QLORA_NB_QWEN_TOKENIZER')
    args.data, args.cache, args.workdir = args.out/f'recs_{args.n}.jsonl', args.out/f'cache-{args.n}', args.out/'work'
    if args.child:
        print('RESULT ' + json.dumps(phase(args.child, args), default=str)); return
    import make_data
    t = time.time(); make_data.write(args.data, args.n)
    print(f'data: {args.data} ({args.data.stat().st_size / 2**20:.0f} MiB, {time.time() - t:.0f} s to make or check)', flush=True)
    rows = []
    for name in args.phases.split(','):
        if name == 'encode_cold' and not args.keep_cache: shutil.rmtree(args.cache, ignore_errors=True)
        if name == 'train_cold_tiny' and not args.keep_cache: shutil.rmtree(f'{args.cache}-tiny', ignore_errors=True)
        rows.append(r := run_phase(name, args))
        with open(args.out/'results.jsonl', 'a') as f: f.write(json.dumps(r, default=str) + '\n')
        print(table([r]).splitlines()[-1], flush=True)
    print(table(rows))

if __name__ == '__main__': main()
