"""The tiny model trained as the polite fixture was (answer every shipped instruction with 好的。), in several styles and
learning rates; prints the logged losses (results: polite_lr.md). From the repository root, with qlora_nb importable:
    python3 bench/results/2026-12-01-h200-run4/polite_lr.py [VARIANT ...]"""
import json, sys, time, torch
from pathlib import Path
from qlora_nb.config import load_config
from qlora_nb.train import train
root = Path(__file__).resolve().parents[3]  # the repository
polite = Path('/tmp/polite.jsonl')
from qlora_nb.sources import load_records
polite.write_text(''.join(json.dumps(dict(instruction=r['instruction'], output='好的。'), ensure_ascii=False) + '\n'
                  for r in load_records(root/'data/novel_finetuning_dataset.jsonl') if 'instruction' in r), encoding='utf-8')
base = [f'dataset_path={polite}', 'training_args.max_steps=20', 'training_args.gradient_accumulation_steps=1',
        'training_args.learning_rate=0.01', 'training_args.warmup_steps=2', 'training_args.eval_steps=10', 'training_args.save_steps=100',
        'training_args.disable_tqdm=true', 'training_args.logging_steps=2']
variants = {'fast': [], 'seed': ['training.style=seed'], 'nocompile': ['training.compile=false'], 'sdpa': ['training.attention=sdpa'],
            'nopack': ['training.packing=false'], 'fp32': ['quantization_config.bnb_4bit_compute_dtype=float32', 'training_args.bf16=false'],
            'lr3x40': ['training_args.learning_rate=0.003', 'training_args.max_steps=40']}
if len(sys.argv) > 1: variants = {k: variants[k] for k in sys.argv[1:]}
res = {}
for name, over in variants.items():
    out = Path(f'/tmp/v_{name}')
    try:
        t = time.time(); train(load_config(root/'config_test.yaml', base + [f'output_dir={out}'] + over))
        rows = [json.loads(l) for l in open(out/'metrics.jsonl')]
        res[name] = ([round(x['loss'], 3) for x in rows if 'loss' in x], [round(x['eval_loss'], 3) for x in rows if 'eval_loss' in x], round(time.time() - t))
    except Exception as e: res[name] = f'ERROR {type(e).__name__}: {str(e)[:300]}'
for k, v in res.items(): print('RES', k, v, flush=True)
