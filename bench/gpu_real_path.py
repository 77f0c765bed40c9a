"""The real path on a GPU: qlora_nb's own code on a random-weight model of the real Qwen2.5-7B architecture.

Builds the model (hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab 152064, rope_theta 1e6,
untied embeddings) with random bf16 weights, saves it to a local folder with the real Qwen2.5 tokenizer files, then runs
`qlora_nb.train.train` with the seed's settings (r 32, alpha 64, dropout 0.1, q/k/v/o, batch 1, accumulation 8, lr 2e-4,
bf16 compute, NF4 + double quant) on the shipped data:
  leg 1: a child process trains and is SIGKILLed as soon as checkpoint-K is complete;
  leg 2: the same command resumes from checkpoint-K, trains to N steps and exports lora_adapter/ and the merged,
         checked final_model/.
Prints tokens/s and peak GPU memory of each leg, the merge check, and a table last. Speed does not depend on weight
values, so random weights measure the real thing; the loss values themselves mean nothing here.

Usage (GPU machine): python bench/gpu_real_path.py --tokenizer DIR [--steps 6] [--kill-after 3] [--work /tmp/qb]
"""
import argparse, json, os, shutil, signal, subprocess, sys, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)

def build_random_7b(out: Path, tokenizer_dir: Path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, GenerationConfig
    if (out/'config.json').exists(): return 0.0
    t = time.time()
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_7B, torch_dtype='bfloat16')
    with torch.device('cuda'): model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, bos_token_id=151643)
    model.save_pretrained(out, max_shard_size='5GB')
    for f in tokenizer_dir.iterdir():
        if f.name in ('vocab.json', 'merges.txt', 'tokenizer_config.json', 'tokenizer.json'): shutil.copy(f, out/f.name)
    n = sum(p.numel() for p in model.parameters())
    del model; torch.cuda.empty_cache()
    print(f'built random Qwen2.5-7B architecture: {n/1e9:.2f} B params in {time.time() - t:.0f} s -> {out}', flush=True)
    return time.time() - t

def write_config(work: Path, model_dir: Path, steps: int, save_steps: int):
    import yaml
    cfg = yaml.safe_load((REPO/'config.yaml').read_text())
    cfg.update(model_name_or_path=str(model_dir), dataset_path=str(REPO/'data/novel_finetuning_dataset.jsonl'), output_dir=str(work/'out'))
    cfg['training_args'].update(max_steps=steps, save_steps=save_steps, logging_steps=1, eval_strategy='no',
                                report_to='none', dataloader_num_workers=0)
    cfg['export'] = dict(check_prompts=4)
    path = work/'bench.yaml'
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path

LEG = '''
import json, sys, time, torch
from transformers import TrainerCallback
from qlora_nb.config import load_config
from qlora_nb.train import train

class Peak(TrainerCallback):
    "Peak GPU memory and wall time of the training loop alone (not loading or merging)."
    def on_train_begin(self, args, state, control, **kw):
        torch.cuda.reset_peak_memory_stats(); self.t, self.step0, self.tok0 = time.time(), state.global_step, state.num_input_tokens_seen
    def on_train_end(self, args, state, control, **kw):
        print('\\nTRAIN_LOOP ' + json.dumps(dict(seconds=time.time() - self.t, steps=state.global_step - self.step0,
              tokens=state.num_input_tokens_seen - self.tok0, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
              reserved_gib=torch.cuda.max_memory_reserved() / 2**30)), flush=True)

cfg = load_config(sys.argv[1], sys.argv[2:])
t = time.time()
res = train(cfg, callbacks=[Peak()])
print('\\nLEG_RESULT ' + json.dumps(dict(wall_s=time.time() - t, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
      metrics=res.metrics, merge_check=res.merge_check, resumed_from=res.resumed_from), default=str), flush=True)
'''

def run_leg(cfg_path, overrides, kill_at=None, out_dir=None):
    "Run one training leg in a child process; SIGKILL it once checkpoint-`kill_at` is complete."
    env = dict(os.environ, PYTHONPATH=f'{REPO}:{os.environ.get("PYTHONPATH", "")}', PYTHONUNBUFFERED='1')
    p = subprocess.Popen([sys.executable, '-c', LEG, str(cfg_path), *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, t = [], time.time()
    def pump():
        for line in p.stdout: lines.append(line); sys.stdout.write(line); sys.stdout.flush()
    reader = threading.Thread(target=pump, daemon=True); reader.start()
    while p.poll() is None:
        if kill_at and (out_dir/f'checkpoint-{kill_at}'/'trainer_state.json').exists():
            p.send_signal(signal.SIGKILL); p.wait()
            print(f'\n*** SIGKILL after checkpoint-{kill_at} ({time.time() - t:.0f} s)', flush=True)
            break
        time.sleep(0.2)
    reader.join(timeout=10)
    text = ''.join(lines)
    grab = lambda tag: next((json.loads(l.split(tag, 1)[1]) for l in text.splitlines() if tag in l), None)
    return p.returncode, grab('LEG_RESULT '), grab('TRAIN_LOOP '), time.time() - t

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--tokenizer', required=True, type=Path)
    ap.add_argument('--work', default='/tmp/qb', type=Path)
    ap.add_argument('--steps', default=6, type=int)
    ap.add_argument('--kill-after', default=3, type=int)
    ap.add_argument('overrides', nargs='*', help='key=value config overrides for both legs')
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    import torch
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    model_dir = a.work/'qwen2.5-7b-random'
    build_s = build_random_7b(model_dir, a.tokenizer)
    cfg = write_config(a.work, model_dir, a.steps, a.kill_after)
    out = a.work/'out'
    rc1, r1, loop1, s1 = run_leg(cfg, a.overrides, kill_at=a.kill_after, out_dir=out)
    rc2, r2, loop2, s2 = run_leg(cfg, a.overrides)
    fm = out/'final_model'
    print('\n| what | value |\n|---|---|')
    print(f'| build random 7B + save | {build_s:.0f} s |')
    print(f'| leg 1 (killed after checkpoint-{a.kill_after}) | rc {rc1}, {s1:.0f} s |')
    print(f'| leg 2 (resume to {a.steps}, export) | rc {rc2}, {s2:.0f} s |')
    if loop2:
        print(f"| leg 2 training loop | {loop2['steps']} optimizer steps (x8 sequences) in {loop2['seconds']:.1f} s |")
        print(f"| leg 2 tokens/s (input tokens seen by the loop / loop time) | {loop2['tokens'] / loop2['seconds']:.0f} |" if loop2['tokens'] else '| tokens | not counted |')
        print(f"| leg 2 peak GPU memory, training loop | {loop2['peak_gib']:.1f} GiB allocated, {loop2['reserved_gib']:.1f} GiB reserved |")
    if r2:
        print(f"| leg 2 resumed from | {r2['resumed_from']} |")
        print(f"| leg 2 peak GPU memory, whole leg incl. merge and check | {r2['peak_gib']:.1f} GiB |")
        print(f"| leg 2 metrics | {json.dumps(r2['metrics'], default=str)} |")
        print(f"| merge check | {json.dumps(r2['merge_check'], default=str)} |")
    print(f"| checkpoints | {sorted(p.name for p in out.glob('checkpoint-*'))} |")
    print(f"| final_model files | {sorted(p.name for p in fm.glob('*'))} |")

if __name__ == '__main__': main()
