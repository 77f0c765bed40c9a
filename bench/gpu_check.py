"""The notebooks and the CLI as users run them, on a GPU machine with no network, in one command.

Phases (each step is a child process with its own timeout; a failure is recorded and the rest goes on):
  preflight  versions (torch, transformers, peft, bitsandbytes, accelerate, ...), GPU, disk; a 4-bit round trip through
             bitsandbytes on the device; `pip check`
  build      a random-weight Qwen2.5-7B folder (the real architecture, bench/gpu_real_path.py's builder) with the real
             Qwen2.5 tokenizer files from --tokenizer
  nbdev      `nbdev_test` on every notebook, no flags (as CI): one `nbdev_test --path nbs/X.ipynb` a notebook,
             --workers at a time, so each has its own pass/fail, seconds and log
  cuda       `nbdev_test --path nbs/X.ipynb --flags cuda` on each notebook with a `#| cuda` cell, with
             QLORA_NB_MODEL=<the random 7B> (the notebooks' cuda cells load ../config.yaml with that model)
  cli        on config.yaml with model_name_or_path=<the random 7B> and small overrides: qlora_nb_validate,
             qlora_nb_train (4 steps, a checkpoint every 2, loss every step, eval every 2), qlora_nb_eval (2 prompts,
             16 new tokens), qlora_nb_generate, qlora_nb_merge; and `alllinear`: qlora_nb_train with
             lora_config.target_modules=all-linear for 10 steps on the shipped (variable-length) data, which must
             export final_model/ through the merge check (issue 7)
The phases run side by side where they can, so the whole check fits one `run` call (--budget 530 s, then whatever still
runs is killed and reported): the build starts with the preflight; nbdev (4 notebooks at a time, those with cuda cells
first) after the preflight; cuda (2 at a time; a notebook never runs in both phases at once) and the CLI chain once the
model is built; alllinear once the CLI's train step is done. Disk: the 7B is 15 GB and each merged final_model/ another
15 GB, so the chain deletes final_model/ after reading its merge check (training_config.json); peak ~45 GB + what the
cuda cells write. Results: a markdown table printed last (versions above it), and gpu_check.md, gpu_check.json and
gpu_check_logs.txt (each step's command and output tail) in $OUT (default ./gpu_check_out), rewritten after every step.
Exit status 0 when every step passed.

Wheels: bench/carry_wheels.sh puts what the image lacks (bitsandbytes, nbdev, ...) and the tokenizer files in .whl/.

  python3 bench/gpu_check.py --tokenizer .whl/qwen2.5-tokenizer            # the whole check on the GPU machine
  python3 bench/gpu_check.py --tokenizer DIR --only cuda --nbs 07_infer    # rerun a part
  python3 bench/gpu_check.py --smoke --only cli                             # on a CPU: data/tiny_qwen, tiny steps
"""
from __future__ import annotations
import argparse, concurrent.futures as cf, json, os, re, shutil, signal, subprocess, sys, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
PHASES = ('nbdev', 'cuda', 'cli')
LOG_TAIL = 60_000  # characters of each step's output kept in gpu_check_logs.txt


def now(): return time.time()


class Check:
    "Runs steps as child processes under one deadline, records them and rewrites the result files after each."
    def __init__(self, a):
        self.a, self.t0 = a, now()
        self.deadline = self.t0 + a.budget
        self.steps, self.lock, self.procs = [], threading.Lock(), set()
        self.out = Path(a.out).resolve(); self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(a.work); (self.work/'logs').mkdir(parents=True, exist_ok=True)
        self.info, self.monitor = {}, {'gpu_mem_used_max_mib': None, 'disk_free_min_gib': None}
        self.stopping = False
        for f in ('gpu_check_logs.txt',): (self.out/f).write_text('')

    # ---- environment for every child
    def env(self, **extra):
        e = dict(os.environ)
        pp = [str(REPO)] + [p for p in e.get('PYTHONPATH', '').split(os.pathsep) if p and Path(p).resolve() != REPO]
        e.update(PYTHONPATH=os.pathsep.join(pp), PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
                 HF_DATASETS_OFFLINE='1', MPLBACKEND='Agg', TOKENIZERS_PARALLELISM='false',
                 OMP_NUM_THREADS=str(self.a.threads), MKL_NUM_THREADS=str(self.a.threads), IPYTHONDIR=str(self.work/'ipython'))
        e.pop('QLORA_NB_MODEL', None)
        e.update({k: str(v) for k, v in extra.items()})
        return e

    # ---- one step
    def run(self, phase, name, cmd, timeout, env=None, cwd=REPO, parse=None, cmdline=None):
        "Run `cmd`; record phase, name, status (pass/fail/timeout/skipped), rc, seconds, notes, log tail."
        left = self.deadline - now() - 5
        rec = dict(phase=phase, step=name, cmd=cmdline or ' '.join(map(str, cmd)), rc=None, seconds=0.0, status='skipped', notes='')
        if self.stopping or left < 15:
            rec['notes'] = 'not started: out of time (--budget)'
            return self.record(rec, '')
        timeout = min(timeout, left)
        log = self.work/'logs'/f"{phase}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        print(f'[{now() - self.t0:5.0f} s] start  {phase:9} {name}', flush=True)
        t = now()
        with open(log, 'w') as fh:
            p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            with self.lock: self.procs.add(p)
            try: rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(p); rc = None
            with self.lock: self.procs.discard(p)
        rec['seconds'] = round(now() - t, 1)
        text = log.read_text(errors='replace')
        if rc is None: rec.update(status='timeout', notes=f'killed after {timeout:.0f} s')
        elif rc < 0 and self.stopping: rec.update(rc=rc, status='timeout', notes='killed at the --budget deadline')
        else:
            rec.update(rc=rc, status='pass' if rc == 0 else 'fail')
            if rc != 0: rec['notes'] = failure_note(text)
        if parse:
            try: parse(rec, text)
            except Exception as e: rec['notes'] += f' (parse: {e!r})'
        print(f'[{now() - self.t0:5.0f} s] {rec["status"]:6} {phase:9} {name}  rc {rc}  {rec["seconds"]:.0f} s  {rec["notes"][:150]}', flush=True)
        return self.record(rec, text)

    def record(self, rec, text):
        with self.lock:
            self.steps.append(rec)
            with open(self.out/'gpu_check_logs.txt', 'a') as f:
                f.write(f"\n\n===== {rec['phase']} / {rec['step']}: {rec['status']} rc {rec['rc']} in {rec['seconds']} s\n$ {rec['cmd']}\n")
                f.write(text[-LOG_TAIL:] if len(text) <= LOG_TAIL else '[... cut ...]\n' + text[-LOG_TAIL:])
            self.write()
        return rec

    def write(self):
        res = dict(info=self.info, monitor=self.monitor, wall_s=round(now() - self.t0, 1), args=vars(self.a), steps=self.steps)
        tmp = self.out/'gpu_check.json.tmp'; tmp.write_text(json.dumps(res, indent=1, default=str)); tmp.replace(self.out/'gpu_check.json')
        tmp = self.out/'gpu_check.md.tmp'; tmp.write_text(self.markdown()); tmp.replace(self.out/'gpu_check.md')

    def markdown(self, width=None):
        "The result as markdown; `width` cuts each row's notes (the printed copy: the run tool keeps 12,000 characters)."
        i, m = self.info, self.monitor
        v = i.get('versions', {})
        lines = [f"## gpu_check ({'smoke, CPU' if self.a.smoke else 'GPU'}): {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.t0))}, "
                 f"{now() - self.t0:.0f} s wall", '',
                 f"Machine: {i.get('gpu', '?')}; {i.get('cpus', '?')} CPUs; python {v.get('python', '?')}; " +
                 ', '.join(f'{k} {v[k]}' for k in ('torch', 'cuda', 'transformers', 'peft', 'bitsandbytes', 'accelerate', 'datasets',
                                                     'nbdev', 'execnb', 'fastcore', 'tokenizers', 'huggingface_hub') if k in v),
                 f"Model: {i.get('model', '?')}. Peak GPU memory used (nvidia-smi, all processes): "
                 f"{m['gpu_mem_used_max_mib'] if m['gpu_mem_used_max_mib'] is not None else '–'} MiB; least free disk in the work dir: "
                 f"{m['disk_free_min_gib'] if m['disk_free_min_gib'] is not None else '–'} GiB.", '',
                 '| phase | step | result | rc | s | notes |', '|---|---|---|---|---|---|']
        order = {p: k for k, p in enumerate(('preflight', 'build', 'nbdev', 'cuda', 'cli', 'alllinear'))}
        for r in sorted(self.steps, key=lambda r: (order.get(r['phase'], 9), r['step'] if r['phase'] in ('nbdev', 'cuda') else '')):
            notes = str(r['notes']).replace('\n', ' ')
            notes = (notes[:width] + ' …' if width and len(notes) > width else notes).replace('|', '\\|')
            lines.append(f"| {r['phase']} | {r['step']} | {'PASS' if r['status'] == 'pass' else r['status'].upper()} | {r['rc']} | {r['seconds']:.0f} | {notes} |")
        n = {s: sum(r['status'] == s for r in self.steps) for s in ('pass', 'fail', 'timeout', 'skipped')}
        lines += ['', f"{n['pass']} passed, {n['fail'] + n['timeout']} failed, {n['skipped']} skipped"]
        return '\n'.join(lines) + '\n'

    def stop_all(self):
        self.stopping = True
        with self.lock: procs = list(self.procs)
        for p in procs: kill_tree(p)


def free_gib(p: Path) -> float:
    "Free disk where `p` is or would be created (0 if no parent folder exists)."
    q = p
    while not q.exists():
        if q == q.parent: return 0.0
        q = q.parent
    return shutil.disk_usage(q).free / 2**30


def kill_tree(p):
    "SIGKILL the child's whole process group (it was started in its own session)."
    try: os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError): pass
    try: p.wait(timeout=30)
    except subprocess.TimeoutExpired: pass


def failure_note(text):
    "The most telling line of a failed step's output: an error line, else the last line."
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for pat in (r'^error: ', r'^[\w.]*(Error|Exception|Interrupt|Exit)\b:', r'^[\w.]*(Error|Exception)\b', r'Error: ', r'nbdev Tests Failed'):
        hits = [l for l in lines if re.search(pat, l)]
        if hits: return hits[-1][:300]
    return (lines[-1] if lines else '(no output)')[:300]


# ---- the phases
PREFLIGHT = r'''
import json, os, platform, shutil, subprocess, sys, importlib, importlib.metadata as md
r = {'python': platform.python_version()}
for n in ['torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate', 'datasets', 'nbdev', 'execnb', 'fastcore', 'tokenizers',
          'huggingface_hub', 'safetensors', 'numpy', 'pyarrow', 'fsspec', 'pandas', 'rapidfuzz', 'sacrebleu', 'IPython', 'matplotlib', 'yaml']:
    try:
        m = importlib.import_module(n); r[n] = getattr(m, '__version__', None) or md.version(n)
        r[n + '_from'] = os.path.dirname(os.path.dirname(m.__file__))
    except Exception as e: r[n] = f'IMPORT FAILED: {type(e).__name__}: {e}'[:300]
import torch
r['cuda'] = torch.version.cuda
r['gpu'] = torch.cuda.get_device_name(0) + f' ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)' if torch.cuda.is_available() else 'none (CPU)'
try:
    import bitsandbytes as bnb, bitsandbytes.functional as F
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    x = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
    q, s = F.quantize_4bit(x, quant_type='nf4'); y = F.dequantize_4bit(q, s, quant_type='nf4')
    rel = ((y.float() - x.float()).norm() / x.float().norm()).item()
    lib = getattr(getattr(bnb, 'cextension', None), 'BNB_BACKEND', '')
    r['bnb_nf4_roundtrip'] = f'ok on {dev}: relative error {rel:.3f}' + (f' ({lib})' if lib else '')
    assert rel < 0.2, rel
except Exception as e: r['bnb_nf4_roundtrip'] = f'FAILED: {type(e).__name__}: {e}'[:400]
print('PREFLIGHT ' + json.dumps(r))
'''


def preflight(c: Check):
    def parse(rec, text):
        line = next((l for l in text.splitlines() if l.startswith('PREFLIGHT ')), None)
        if not line: return
        v = json.loads(line[len('PREFLIGHT '):])
        c.info['versions'] = {k: x for k, x in v.items() if not k.endswith('_from') and k not in ('gpu', 'bnb_nf4_roundtrip')}
        c.info['imported_from'] = {k[:-5]: x for k, x in v.items() if k.endswith('_from')}
        c.info['gpu'], c.info['bnb_nf4_roundtrip'] = v.get('gpu'), v.get('bnb_nf4_roundtrip')
        bad = [f'{k}: {x}' for k, x in v.items() if isinstance(x, str) and ('FAILED' in x)]
        rec['notes'] = '; '.join(bad) if bad else f"{v.get('gpu')}; torch {v.get('torch')}, transformers {v.get('transformers')}, " \
                       f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')} ({v.get('bnb_nf4_roundtrip')})"
        if bad: rec['status'] = 'fail'
    c.run('preflight', 'versions + bitsandbytes NF4 round trip', [sys.executable, '-c', PREFLIGHT], 120, parse=parse,
          cmdline='python3 -c <versions, NF4 round trip>')
    # datasets is carried for transformers' Trainer, which imports it when it is installed: if it cannot import here
    # (an incompatible pyarrow/fsspec in the image), move the carried copy aside so training still works, and say so.
    bad = str(c.info.get('versions', {}).get('datasets', ''))
    src = c.info.get('imported_from', {}).get('datasets')
    if bad.startswith('IMPORT FAILED') and not src:
        for d in filter(None, os.environ.get('PYTHONPATH', '').split(os.pathsep)):
            if (Path(d)/'datasets'/'__init__.py').exists():
                (Path(d)/'datasets').rename(Path(d)/'datasets.disabled-by-gpu_check')
                c.info['datasets_disabled'] = f'{d}/datasets moved aside: {bad}'
                print(f"*** {c.info['datasets_disabled']}", flush=True)
    def pipcheck(rec, text):
        lines = [l for l in text.splitlines() if l.strip() and 'pip version' not in l]
        c.info['pip_check'] = lines[:40]
        rec['notes'] = f'{len(lines)} lines (gpu_check.json info.pip_check)' if rec['rc'] else 'no broken requirements'
        rec['status'] = 'pass'  # informative: the image's own packages may have unrelated conflicts
    c.run('preflight', 'pip check', [sys.executable, '-m', 'pip', 'check', '--disable-pip-version-check'], 120, parse=pipcheck)
    # the notebooks (09_cli, index) run the qlora_nb_* commands: they must be on PATH, installed from this tree
    names = re.findall(r'^\s*(?:console_scripts\s*=\s*)?(qlora_nb_\w+)=', (REPO/'settings.ini').read_text(), re.M)
    probe = (f'import shutil, sys; missing = [n for n in {names!r} if not shutil.which(n)]; '
             'print("missing from PATH:", " ".join(missing) or "none"); sys.exit(1 if missing else 0)')
    def commands(rec, text):
        rec['notes'] = text.strip().splitlines()[-1] if text.strip() else ''
        if rec['rc']: rec['notes'] += ' (install the tree: pip install --no-deps --no-build-isolation --upgrade --target DIR .)'
    c.run('preflight', 'qlora_nb_* commands on PATH', [sys.executable, '-c', probe], 60, parse=commands,
          cmdline='python3 -c <shutil.which each console script>')
    c.info['cpus'] = os.cpu_count()
    du = shutil.disk_usage(c.work)
    c.info['work'] = f'{c.work} ({du.free / 2**30:.0f} GiB free of {du.total / 2**30:.0f})'
    print(f"work dir {c.info['work']}", flush=True)


BUILD = r'''
import shutil, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from gpu_real_path import build_random_7b
out, tok = Path(sys.argv[2]), Path(sys.argv[3])
part = out.with_name(out.name + '.partial'); shutil.rmtree(part, ignore_errors=True)
build_random_7b(part, tok)
missing = [f for f in ('vocab.json', 'merges.txt', 'tokenizer_config.json') if not (part/f).exists()]
assert not missing, f'tokenizer files missing from {tok}: {missing}'
part.rename(out)
print('BUILT', sum(f.stat().st_size for f in out.iterdir()) / 2**30, 'GiB')
'''


def build_model(c: Check):
    "The random-weight Qwen2.5-7B folder (or data/tiny_qwen with --smoke); None if it could not be made."
    if c.a.model:
        c.info['model'] = f'{c.a.model} (--model)'
        return Path(c.a.model).resolve()
    if c.a.smoke:
        c.info['model'] = str(REPO/'data/tiny_qwen') + ' (tiny Qwen2, --smoke)'
        return REPO/'data/tiny_qwen'
    out = c.work/'qwen2.5-7b-random'
    c.info['model'] = f'{out} (random-weight Qwen2.5-7B architecture, bf16, real Qwen2.5 tokenizer files from {c.a.tokenizer})'
    if (out/'config.json').exists() and list(out.glob('*.safetensors')):
        c.record(dict(phase='build', step='random Qwen2.5-7B', cmd='(reused)', rc=0, seconds=0.0, status='pass', notes=f'reused {out}'), '')
        return out
    tok = Path(c.a.tokenizer or '')
    if not (tok/'vocab.json').exists():
        c.record(dict(phase='build', step='random Qwen2.5-7B', cmd='', rc=None, seconds=0.0, status='fail',
                      notes=f'--tokenizer {tok}: no vocab.json there (give the folder with the Qwen2.5 tokenizer files)'), '')
        return None
    r = c.run('build', 'random Qwen2.5-7B', [sys.executable, '-c', BUILD, BENCH, out, tok.resolve()], 300,
              cmdline=f'build_random_7b({out}, {tok})', parse=lambda rec, t: rec.update(notes=next((l for l in t.splitlines() if l.startswith('built ')), rec['notes'])))
    return out if r['status'] == 'pass' else None


def notebooks(c: Check, cuda_only=False):
    "The notebooks nbdev_test would test (nbdev's own nbglob), optionally only those with a `#| cuda` cell."
    from nbdev.doclinks import nbglob
    from nbdev.config import get_config
    old = os.getcwd(); os.chdir(REPO)
    try: files = sorted(Path(f) for f in nbglob(REPO/get_config().nbs_path, as_path=True))
    finally: os.chdir(old)
    files = [f for f in files if not any(p.startswith(('.', '_')) for p in f.relative_to(REPO).parts)]
    if c.a.nbs: files = [f for f in files if any(re.search(pat, f.stem) for pat in c.a.nbs.split(','))]
    if cuda_only: files = [f for f in files if has_flag(f, 'cuda')]
    return files


def has_flag(nb: Path, flag: str) -> bool:
    nbj = json.loads(nb.read_text())
    return any(c['cell_type'] == 'code' and re.search(rf'^#\|\s*{flag}\b', ''.join(c['source']), re.M) for c in nbj['cells'])


def script(c: Check, name, module, fn):
    """A launcher file like the one pip writes for a console script (fastcore's call_parse reads sys.argv only when called
    from a file's __main__ module, not from `python -c`): the package is not installed on the GPU machine."""
    f = c.work/'bin'/f'{name}.py'
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(f'import sys\nfrom {module} import {fn}\nif __name__ == "__main__":\n    sys.argv[0] = "{name}"\n    sys.exit({fn}())\n')
    return [sys.executable, f]

_nb_locks: dict[str, threading.Lock] = {}


def run_notebooks(c: Check, phase, files, workers, flags='', env=None, timeout=450):
    "`nbdev_test --path NB [--flags F]`, `workers` at a time; one notebook never runs twice at once (a per-notebook lock)."
    def one(f):
        rel = f.relative_to(REPO)
        cmd = script(c, 'nbdev_test', 'nbdev.test', 'nbdev_test') + ['--path', rel] + (['--flags', flags] if flags else [])
        with _nb_locks.setdefault(f.name, threading.Lock()):
            return c.run(phase, f.stem, cmd, timeout, env=env, cmdline=f'nbdev_test --path {rel}' + (f' --flags {flags}' if flags else ''))
    with cf.ThreadPoolExecutor(max(1, workers)) as ex: list(ex.map(one, files))


def cli(c: Check, name):
    "A qlora_nb_* command (the package is on PYTHONPATH, not installed, on the GPU machine)."
    fn = {'qlora_nb_validate': 'validate_cli', 'qlora_nb_train': 'train_cli', 'qlora_nb_eval': 'eval_cli',
          'qlora_nb_generate': 'generate_cli', 'qlora_nb_merge': 'merge_cli'}[name]
    return script(c, name, 'qlora_nb.cli', fn)


def cli_overrides(c: Check, model, out_dir, steps, extra=()):
    s = c.a.smoke
    ov = [f'model_name_or_path={model}', f'output_dir={out_dir}', f'training_args.max_steps={steps}',
          'training_args.logging_steps=1', 'training_args.report_to=none', 'eval.num_prompts=2',
          f'eval.max_new_tokens={8 if s else 16}', 'eval.batch_size=2']
    if s: ov += ['data.max_length=256', 'quantization_config.bnb_4bit_compute_dtype=auto', 'training_args.gradient_accumulation_steps=2',
                 'export.check_prompts=2']
    return ov + list(extra)


def merge_figures(final_dir: Path):
    "The merge check recorded in final_model/training_config.json, numbers rounded."
    f = final_dir/'training_config.json'
    if not f.exists(): return None
    mc = json.loads(f.read_text()).get('merge_check') or {}
    rnd = lambda x: (float(f'{x:.4g}') if isinstance(x, float) else {k: rnd(v) for k, v in x.items()} if isinstance(x, dict) else x)
    return {k: rnd(v) for k, v in mc.items() if not isinstance(v, list) or len(v) <= 8}


def fmt_merge(mc):
    """The merge check's figures on one line, whatever its keys (merge_check.check_merge decides them): verdicts and
    the weight-space check first, then the distribution distances, then the rest; nested dicts flattened one level
    (weights.max_err_over_bound)."""
    if not mc: return ''
    flat = {}
    for k, v in mc.items():
        if isinstance(v, dict): flat.update({f'{k}.{k2}': v2 for k2, v2 in v.items() if not isinstance(v2, (dict, list))})
        elif isinstance(v, list): flat[k] = '; '.join(map(str, v)) if v else None
        else: flat[k] = v
    order = [r'problems', r'^passed$', r'\.passed$', r'bound', r'worst', r'layers', r'dtype', r'kl', r'loss', r'logit', r'agree']
    rank = lambda k: next((i for i, pat in enumerate(order) if re.search(pat, k)), len(order))
    return 'merge check: ' + ', '.join(f'{k} {flat[k]}' for k in sorted(flat, key=rank) if flat[k] is not None)[:900]


def eval_note(text):
    "qlora_nb_eval's markdown table rows as 'metric base -> tuned', on one line."
    rows = [[x.strip() for x in l.strip().strip('|').split('|')] for l in text.splitlines() if l.lstrip().startswith('|') and '---' not in l]
    return '; '.join(f'{r[0]} {r[1]} -> {r[2]}' for r in rows if len(r) == 3 and r[0] != 'metric')[:500]


def grab(text, pat):
    m = [l.strip() for l in text.splitlines() if re.search(pat, l)]
    return m[-1] if m else ''


def cli_sequence(c: Check, model: Path, train_done: threading.Event):
    out = c.work/'cli_out'
    shutil.rmtree(out, ignore_errors=True)
    steps = 2 if c.a.smoke else c.a.steps
    ov = cli_overrides(c, model, out, steps, [f'training_args.save_steps={max(1, steps // 2)}', f'training_args.eval_steps={max(1, steps // 2)}'])
    cfg = REPO/'config.yaml'
    show = lambda name, extra=(): f"{name} config.yaml {' '.join(ov)}" + (' ' + ' '.join(extra) if extra else '')
    T = c.a.step_timeout
    c.run('cli', 'qlora_nb_validate', cli(c, 'qlora_nb_validate') + [cfg] + ov, T, cmdline=show('qlora_nb_validate'),
          parse=lambda r, t: r.update(notes=(r['notes'] + ' ' + grab(t, r'^split ')).strip()))

    def p_train(r, t):
        mc = merge_figures(out/'final_model')
        r['merge_check'] = mc
        r['notes'] = '; '.join(x for x in (r['notes'] if r['status'] != 'pass' else '', grab(t, r'^trained '),
                                            'checkpoints: ' + ','.join(sorted(p.name for p in out.glob('checkpoint-*'))),
                                            fmt_merge(mc) or grab(t, r'^final model')) if x)
    c.run('cli', 'qlora_nb_train', cli(c, 'qlora_nb_train') + [cfg] + ov, T, cmdline=show('qlora_nb_train'), parse=p_train)
    shutil.rmtree(out/'final_model', ignore_errors=True)  # 15 GB: qlora_nb_merge writes it again below
    train_done.set()
    c.run('cli', 'qlora_nb_eval', cli(c, 'qlora_nb_eval') + [cfg] + ov, T, cmdline=show('qlora_nb_eval'),
          parse=lambda r, t: r.update(notes=r['notes'] or eval_note(t)))
    gen = ['--prompt', '写一段雨夜客栈的开头']
    c.run('cli', 'qlora_nb_generate', cli(c, 'qlora_nb_generate') + [cfg] + gen + ov, T, cmdline=show('qlora_nb_generate', gen),
          parse=lambda r, t: r.update(notes=(r['notes'] or grab(t, r'^note: ') or 'answered, stopped at <|im_end|>')[:300]))

    def p_merge(r, t):
        mc = merge_figures(out/'final_model'); r['merge_check'] = mc
        r['notes'] = (r['notes'] + ' ' if r['status'] != 'pass' else '') + (fmt_merge(mc) or grab(t, r'^merged |^error: '))
    c.run('cli', 'qlora_nb_merge', cli(c, 'qlora_nb_merge') + [cfg] + ov, T, cmdline=show('qlora_nb_merge'), parse=p_merge)
    shutil.rmtree(out/'final_model', ignore_errors=True)


def alllinear(c: Check, model: Path):
    "Issue 7's case: all-linear LoRA targets, 10 steps on the shipped data; the export must pass the merge check (exit 0)."
    out = c.work/'alllinear_out'
    shutil.rmtree(out, ignore_errors=True)
    steps = 3 if c.a.smoke else c.a.alllinear_steps
    ov = cli_overrides(c, model, out, steps, ['lora_config.target_modules=all-linear', f'training_args.save_steps={steps}'])

    def parse(r, t):
        mc = merge_figures(out/'final_model'); r['merge_check'] = mc
        r['notes'] = '; '.join(x for x in (r['notes'] if r['status'] != 'pass' else '', grab(t, r'^trained '),
                                            fmt_merge(mc) or grab(t, r'^final model|^error: |MergeCheckError')) if x)
    c.run('alllinear', f'qlora_nb_train all-linear {steps} steps', cli(c, 'qlora_nb_train') + [REPO/'config.yaml'] + ov, c.a.step_timeout,
          cmdline=f"qlora_nb_train config.yaml {' '.join(ov)}", parse=parse)
    shutil.rmtree(out/'final_model', ignore_errors=True)

    def broken(r, t):  # the correct merge passes, a doubled scale and an unmerged layer are refused (issue 7 item 4)
        r['notes'] = '; '.join(l for l in t.splitlines() if l.startswith(('{"case"', 'merge check ')))[:900]
    c.run('alllinear', 'merge check: correct vs broken merges', [sys.executable, str(REPO/'bench/gpu_merge_check.py'),
          str(REPO/'config.yaml')] + ov, c.a.step_timeout, cmdline='python bench/gpu_merge_check.py config.yaml ...', parse=broken)
    shutil.rmtree(out/'final_model_gpu_check', ignore_errors=True)


def monitor(c: Check, stop: threading.Event):
    "Sample GPU memory in use (nvidia-smi) and free disk in the work dir every few seconds."
    smi = shutil.which('nvidia-smi') and not c.a.smoke
    while not stop.wait(3):
        try:
            free = round(shutil.disk_usage(c.work).free / 2**30, 1)
            m = c.monitor; m['disk_free_min_gib'] = free if m['disk_free_min_gib'] is None else min(m['disk_free_min_gib'], free)
            if smi:
                used = max(int(x) for x in subprocess.run(['nvidia-smi', '--query-gpu=memory.used', '--format=csv,noheader,nounits'],
                                                           capture_output=True, text=True, timeout=10).stdout.split())
                m['gpu_mem_used_max_mib'] = used if m['gpu_mem_used_max_mib'] is None else max(m['gpu_mem_used_max_mib'], used)
        except Exception: pass
        if now() > c.deadline: c.stop_all()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument('--tokenizer', help='folder with the Qwen2.5 tokenizer files (vocab.json, merges.txt, tokenizer_config.json)')
    ap.add_argument('--only', default='', help='comma-separated phases to run: nbdev, cuda, cli (cli includes the all-linear case)')
    ap.add_argument('--nbs', default='', help='comma-separated regexes: test only notebooks whose name matches one')
    ap.add_argument('--model', help='use this model folder instead of building the random 7B (e.g. a local Qwen2.5-7B-Instruct)')
    ap.add_argument('--smoke', action='store_true', help='on a CPU: data/tiny_qwen instead of the 7B, tiny steps')
    ap.add_argument('--workers', type=int, default=None, help='notebooks tested at once, no flags (default 4 on a GPU, 1 with --smoke)')
    ap.add_argument('--cuda-workers', type=int, default=2, help='notebooks tested at once with --flags cuda (each cuda cell loads the 7B in '
                    '4 bits, ~6-20 GiB; they train into temp dirs)')
    ap.add_argument('--threads', type=int, default=None, help='OMP_NUM_THREADS of each child (default cpus // 6, at least 1)')
    ap.add_argument('--steps', type=int, default=4, help='qlora_nb_train steps of the CLI sequence')
    ap.add_argument('--alllinear-steps', type=int, default=10)
    ap.add_argument('--budget', type=float, default=530, help='seconds for the whole check; then everything still running is killed')
    ap.add_argument('--nb-timeout', type=float, default=450, help='seconds per notebook (no flags)')
    ap.add_argument('--cuda-timeout', type=float, default=420, help='seconds per notebook with --flags cuda')
    ap.add_argument('--step-timeout', type=float, default=400, help='seconds per CLI command')
    ap.add_argument('--serial', action='store_true', help='run the phases one after another instead of side by side')
    ap.add_argument('--parallel', action='store_true', help='with --smoke: run the phases side by side as on the GPU')
    ap.add_argument('--work', default=None, help='scratch folder for the model and the runs, ~50 GB (default: /tmp/gpucheck, or '
                    '/var/tmp/gpucheck or the folder beside the repo if that has more free disk)')
    ap.add_argument('--out', default=os.environ.get('OUT') or 'gpu_check_out', help='where the result files go (default $OUT)')
    a = ap.parse_args(argv)
    only = set(filter(None, a.only.split(','))) or set(PHASES)
    if bad := only - set(PHASES): ap.error(f'--only: unknown phase {sorted(bad)}; use {", ".join(PHASES)}')
    cpus = os.cpu_count() or 2
    a.workers = a.workers or (1 if a.smoke else 4)
    a.threads = a.threads or max(1, cpus // 6)
    a.work = Path(a.work).resolve() if a.work else max((Path(p) for p in ('/tmp/gpucheck', '/var/tmp/gpucheck', REPO.parent/'gpucheck_work')),
                                                       key=lambda p: free_gib(p))
    if not a.smoke and not a.tokenizer and (d := REPO/'.whl/qwen2.5-tokenizer').exists(): a.tokenizer = str(d)
    c = Check(a)
    print(f'gpu_check: phases {sorted(only)}, budget {a.budget:.0f} s, work {a.work}, out {c.out}', flush=True)
    stop = threading.Event()
    threading.Thread(target=monitor, args=(c, stop), daemon=True).start()
    try:
        model_ready, train_done, checked = threading.Event(), threading.Event(), threading.Event()
        holder = {}

        def lane_build():
            holder['model'] = build_model(c) if only & {'cuda', 'cli'} else None
            model_ready.set()

        def lane_nbdev():
            checked.wait()  # preflight may move a carried datasets aside that cannot import: before any notebook imports it
            if 'nbdev' not in only: return
            files = notebooks(c)
            files.sort(key=lambda f: not has_flag(f, 'cuda'))  # those the cuda phase needs first: it waits for none
            run_notebooks(c, 'nbdev', files, a.workers, timeout=a.nb_timeout)

        def lane_cuda():
            if 'cuda' not in only: return
            checked.wait(); model_ready.wait()
            files = notebooks(c, cuda_only=True)
            if holder.get('model') is None:
                for f in files: c.record(dict(phase='cuda', step=f.stem, cmd='', rc=None, seconds=0.0, status='skipped', notes='no model (build failed)'), '')
                return
            run_notebooks(c, 'cuda', files, a.cuda_workers, flags='cuda', env=c.env(QLORA_NB_MODEL=holder['model']), timeout=a.cuda_timeout)

        def lane_cli():
            if 'cli' not in only: return
            checked.wait(); model_ready.wait()
            if holder.get('model') is None:
                c.record(dict(phase='cli', step='(all)', cmd='', rc=None, seconds=0.0, status='skipped', notes='no model (build failed)'), ''); return
            cli_sequence(c, holder['model'], train_done)

        def lane_alllinear():
            if 'cli' not in only: return
            model_ready.wait()
            if holder.get('model') is None: return
            train_done.wait()  # starts once the CLI train step is done and its 15 GB final_model/ deleted: disk stays < 50 GB
            alllinear(c, holder['model'])

        def guarded(lane):
            "A lane that raises is recorded as a failed step; the events it owes are set so no other lane waits for ever."
            def run():
                try: lane()
                except Exception as e:
                    import traceback
                    c.record(dict(phase=lane.__name__.removeprefix('lane_'), step='(lane crashed)', cmd='', rc=None, seconds=0.0,
                                  status='fail', notes=f'{type(e).__name__}: {e}'[:300]), traceback.format_exc())
                finally:
                    if lane is lane_build: model_ready.set()
                    if lane is lane_preflight: checked.set()
                    if lane is lane_cli: train_done.set()
            return run

        def lane_preflight(): preflight(c)

        # the build (GPU, ~30 s) starts with the preflight; the rest wait for the preflight
        lanes = [guarded(l) for l in (lane_build, lane_preflight, lane_nbdev, lane_cuda, lane_cli, lane_alllinear)]
        if a.serial or (a.smoke and not a.parallel):
            for lane in (lanes[1], lanes[0], lanes[4], lanes[5], lanes[2], lanes[3]): lane()
        else:
            ts = [threading.Thread(target=lane, daemon=True) for lane in lanes]
            for t in ts: t.start()
            for t in ts:
                while t.is_alive():
                    t.join(timeout=1)
                    if now() > c.deadline + 60: break
    except KeyboardInterrupt:
        c.stop_all()
    finally:
        stop.set()
        c.write()
    print_summary(c)
    return 0 if all(r['status'] == 'pass' for r in c.steps) else 1


def print_summary(c: Check):
    "Failures' output tails, the versions, then the table (the run tool keeps the last 12,000 characters)."
    bad = [r for r in c.steps if r['status'] in ('fail', 'timeout')]
    if bad: print('\n=== failures (each step\'s full output tail: gpu_check_logs.txt) ===')
    for r in bad[:6]:
        log = c.work/'logs'/f"{r['phase']}-{re.sub(r'[^A-Za-z0-9_.-]', '_', r['step'])}.log"
        tail = log.read_text(errors='replace')[-600:] if log.exists() else ''
        print(f"--- {r['phase']} / {r['step']} ({r['status']}, rc {r['rc']}):\n{tail.rstrip()}")
    v = c.info.get('versions', {})
    print('\n=== versions ===')
    print(', '.join(f'{k} {v.get(k)}' for k in ('python', 'torch', 'cuda', 'transformers', 'peft', 'bitsandbytes', 'accelerate',
                                                'datasets', 'nbdev', 'tokenizers', 'huggingface_hub')) + f"; GPU: {c.info.get('gpu')}")
    if c.info.get('datasets_disabled'): print('NOTE:', c.info['datasets_disabled'])
    print(f'results: {c.out}/gpu_check.md, gpu_check.json, gpu_check_logs.txt\n')
    print(c.markdown(width=240))


if __name__ == '__main__': sys.exit(main())
