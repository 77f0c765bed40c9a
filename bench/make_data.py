"""A deterministic, varied N-record JSONL built from the shipped records (for bench/data_scale.py).

    python bench/make_data.py 1000000 output/data_scale/recs_1000000.jsonl

Each record recombines shipped records: the instruction of one, an input cut from another, an output made of a rotated
slice of a third's output plus the head of a fourth's (so lengths spread from ~100 to ~3000 characters), a system prompt
on some; one in ten is a 2-3 turn `messages` record; one in a thousand repeats an earlier record exactly (duplicates).
The same N and seed always give the same bytes.
"""
import json, random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent/'data'

def shipped(data_dir):
    d = Path(data_dir)
    recs = [json.loads(l) for l in (d/'novel_finetuning_dataset.jsonl').read_text(encoding='utf-8').splitlines() if l.strip()]
    multi = [json.loads(l) for l in (d/'multiturn_example.jsonl').read_text(encoding='utf-8').splitlines() if l.strip()]
    return recs, multi

def _slice(rng, text, lo, hi):
    n = len(text)
    if n <= lo: return text
    k = rng.randint(lo, min(hi, n))
    a = rng.randint(0, n - k)
    return text[a:a + k]

def records(n: int, data_dir=DATA, seed: int = 0):
    "Yield `n` records, deterministic for (n-independent) `seed`: record j is the same for any n > j."
    recs, multi = shipped(data_dir)
    outs = [r['output'] for r in recs]
    systems = sorted({r['system'] for r in recs if r.get('system')}) + ['你是一位擅长悬疑与武侠的作家，文字简洁有力。']
    rng, made = random.Random(seed), []
    for j in range(n):
        u = rng.random()
        if j and j % 1000 == 999:  # an exact duplicate of an earlier record
            rec = made[rng.randrange(len(made))]
        elif u < 0.1:  # a multi-turn conversation
            turns, base = rng.randint(2, 3), multi[rng.randrange(len(multi))]
            msgs = [m for m in base['messages'] if m['role'] == 'system'][:1]
            for t in range(turns):
                a, b = recs[rng.randrange(len(recs))], recs[rng.randrange(len(recs))]
                msgs.append({'role': 'user', 'content': a['instruction'] + (f'（第{t + 1}轮，稿{j}）')})
                msgs.append({'role': 'assistant', 'content': _slice(rng, b['output'], 60, 400)})
            rec = {'messages': msgs}
        else:
            a = recs[rng.randrange(len(recs))]
            rec = {'instruction': a['instruction'] + f'（稿{j}）'}
            if rng.random() < 0.5:
                src = recs[rng.randrange(len(recs))]
                rec['input'] = _slice(rng, src.get('input') or src['output'], 30, 300)
            o1, o2 = outs[rng.randrange(len(outs))], outs[rng.randrange(len(outs))]
            cut = rng.randrange(len(o1))
            out = (o1[cut:] + o1[:cut]) if rng.random() < 0.5 else o1
            if rng.random() < 0.15: out += '\n' + _slice(rng, o2, 50, 800)
            rec['output'] = out
            if rng.random() < 0.2: rec['system'] = systems[rng.randrange(len(systems))]
        if len(made) < 5000: made.append(rec)
        yield rec

def write(path, n: int, data_dir=DATA, seed: int = 0) -> Path:
    "Write `n` records to `path` (skipped when it already has exactly `n` lines)."
    p = Path(path)
    if p.is_file():
        with open(p, 'rb') as f: have = sum(1 for _ in f)
        if have == n: return p
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + '.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        for rec in records(n, data_dir, seed): f.write(json.dumps(rec, ensure_ascii=False) + '\n')
    tmp.replace(p)
    return p

if __name__ == '__main__':
    import sys
    n, out = int(sys.argv[1]), Path(sys.argv[2])
    print(write(out, n), f'{out.stat().st_size / 2**20:.0f} MiB')
