"""Merge check on a real run, for the GPU: the correct merge (merge_adapter) and two broken ones (one layer's scale doubled; left unmerged).
Exits 0 only when the correct merge passes and both broken ones are refused (bench/gpu_check.py runs it after its all-linear run).

usage: python gpu_merge_check.py CONFIG [key=value ...]   (the run's config and overrides; output_dir must hold lora_adapter/)
Prints one JSON line per case: the weight check (passed, max error / bound, weights over, layers, seconds), KL and loss figures, peak GPU memory.
"""
import json, sys, time, torch
verdicts = []
from pathlib import Path
from peft import PeftModel
from qlora_nb.config import load_config
from qlora_nb.model import load_model, free_memory
from qlora_nb.export import merge_adapter, load_merge_base
from qlora_nb.merge_check import check_merge_weights, exact_float32

cfg = load_config(sys.argv[1], sys.argv[2:])
adapter = Path(cfg.output_dir)/'lora_adapter'
def peak():
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None
def show(case, w, extra=None):
    keep = ('passed', 'dtype', 'layers', 'elements', 'max_err_over_bound', 'worst_layer', 'layers_over', 'elements_over', 'seconds')
    verdicts.append(w['passed'])
    print(json.dumps({'case': case, **{k: w[k] for k in keep}, 'problems': w['problems'][:2], **(extra or {}), 'peak_gib': peak()}, default=str), flush=True)

t = time.time()
res = merge_adapter(cfg, out_dir=Path(cfg.output_dir)/'final_model_gpu_check')
c = res.check
show('correct (merge_adapter)', c['weights'], {k: c[k] for k in ('kl_mean', 'kl_max', 'eval_loss_diff', 'max_abs_logit_diff', 'token_agreement', 'n_tokens')}
     | {'merge_seconds': round(time.time() - t, 1)})
adapted = PeftModel.from_pretrained(load_model(cfg), str(adapter)).eval()
layers = [n for n, m in adapted.get_base_model().named_modules() if hasattr(m, 'lora_A') and 'default' in m.lora_A]
layer = layers[len(layers) // 2]  # a layer in the middle of the model
for case, factor in (('scale doubled', 2.0), ('unmerged', 0.0)):
    pm = PeftModel.from_pretrained(load_merge_base(cfg), str(adapter))
    pm.get_base_model().get_submodule(layer).scaling['default'] *= factor
    with exact_float32(): broken = pm.merge_and_unload().eval()
    del pm
    show(f'{layer}: {case}', check_merge_weights(broken, adapted))
    del broken; free_memory()
ok = verdicts[:1] == [True] and verdicts[1:] == [False, False]
print(f'merge check {"tells" if ok else "does NOT tell"} the correct merge from the broken ones: {verdicts}', flush=True)
sys.exit(0 if ok else 1)
