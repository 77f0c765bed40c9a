#!/usr/bin/env bash
# Wheels for the GPU machine (the device tool's nvidia-h200 image: Python 3.12, no network).
#
# Downloads into <repo>/.whl/ every wheel that qlora_nb's tests and CLI need there and the image lacks
# (bitsandbytes, nbdev and its tree, datasets' own deps, rapidfuzz), for cp312 manylinux x86_64, pinned to the versions
# the CPU CI uses; strips bitsandbytes to the CUDA 13.0 library (torch there is 2.11+cu130) so the whole tree + wheels
# stay far under the 64 MiB a `run` call may carry; copies the Qwen2.5 tokenizer files into .whl/qwen2.5-tokenizer/
# (gpu_check.py --tokenizer); prints each wheel's size, the total, and the lines to use on the GPU machine.
#
#   bench/carry_wheels.sh            # download the pinned set into .whl/ (idempotent: it empties .whl/ first)
#   bench/carry_wheels.sh --resolve  # re-derive the set from the top-level requirements (Requires-Dist walk for
#                                    # py3.12/linux, minus the image's packages) and diff it with the pins below
#   bench/carry_wheels.sh --check    # install .whl/ with the GPU command's pip line into a clean Python 3.12 venv that
#                                    # holds only the image packages these wheels need, and import everything
# Env: PYTHON (a Python with pip, default python3), TOKENIZER_SRC (default ../shared/reference/qwen2.5-tokenizer),
#      PY312 (a python3.12 for --check; default: pyenv's 3.12 if present).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(git -C "$HERE" rev-parse --show-toplevel)
DEST=$ROOT/.whl
PY=${PYTHON:-python3}
MODE=${1:-download}

# The pinned set: name==version, one a line. Top level: bitsandbytes (4-bit), nbdev/execnb/fastcore (the notebooks'
# tests), datasets (a declared requirement; transformers' Trainer imports it when present), rapidfuzz. The rest is their
# closure minus what the image has (`--resolve` re-derives it). Versions: the CPU venv's, where CI passes.
PINS='
bitsandbytes==0.50.2
nbdev==2.4.14
execnb==0.1.18
fastcore==1.14.5
ghapi==2.0.3
fastspec==0.1.0
fastgit==0.1.4
astunparse==1.6.3
asttokens==3.0.2
watchdog==7.1.0
ipython==9.18.1
ipython-pygments-lexers==1.1.1
jedi==0.20.1
parso==0.8.7
matplotlib-inline==0.2.2
traitlets==5.16.1
pexpect==4.9.0
ptyprocess==0.7.0
prompt-toolkit==3.0.53
wcwidth==0.9.4
stack-data==0.6.3
executing==2.3.0
pure-eval==0.2.4
datasets==5.2.0
dill==0.4.1
multiprocess==0.70.19
rapidfuzz==3.14.6
'
TOP='bitsandbytes==0.50.2 nbdev==2.4.14 execnb<0.2 fastcore>=1.12.3,<2 datasets==5.2.0 rapidfuzz'
KEEP_BNB_LIBS=${KEEP_BNB_LIBS:-cuda130 cpu}   # torch on the image is 2.11.0+cu130: bitsandbytes loads libbitsandbytes_cuda130.so
PLATFORMS='--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64'
PIPDL="$PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none $PLATFORMS"
TOKENIZER_SRC=${TOKENIZER_SRC:-$ROOT/../shared/reference/qwen2.5-tokenizer}
[ -d "$TOKENIZER_SRC" ] || TOKENIZER_SRC=/work/shared/reference/qwen2.5-tokenizer

# The image's packages (KINDS.md, "Python packages already there", read 2026-11-17), and the versions known there.
IMAGE='absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp'
IMAGE_VERSIONS='accelerate==1.15.0 huggingface-hub==1.33.0 numpy==2.5.2 safetensors==0.8.0 tokenizers==0.23.2
torch==2.11.0 transformers==5.17.0 triton==3.6.0 peft==0.21.0'
export IMAGE IMAGE_VERSIONS PINS TOP

case "$MODE" in
--resolve)
  WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
  PIPDL="$PIPDL" WORK="$WORK" $PY - <<'EOF'
# Walk Requires-Dist from the top-level requirements for CPython 3.12 on linux x86_64, downloading each wheel (--no-deps)
# that the image lacks; stop at image packages, but check their known versions against what the wheels require.
import os, re, subprocess, zipfile, glob, shlex, collections
try: from packaging.requirements import Requirement; from packaging.specifiers import SpecifierSet; from packaging.utils import canonicalize_name
except ImportError: from pip._vendor.packaging.requirements import Requirement; from pip._vendor.packaging.specifiers import SpecifierSet; from pip._vendor.packaging.utils import canonicalize_name
env = dict(python_version='3.12', python_full_version='3.12.3', sys_platform='linux', platform_system='Linux', os_name='posix',
           platform_machine='x86_64', implementation_name='cpython', platform_python_implementation='CPython', extra='')
image = {canonicalize_name(n) for n in os.environ['IMAGE'].split()}
known = {canonicalize_name(r.split('==')[0]): r.split('==')[1] for r in os.environ['IMAGE_VERSIONS'].split()}
pins = {canonicalize_name(r.split('==')[0]): r.split('==')[1] for r in os.environ['PINS'].split()}
work, dl = os.environ['WORK'], shlex.split(os.environ['PIPDL'])
specs, chosen, needed_by, todo = collections.defaultdict(SpecifierSet), {}, collections.defaultdict(set), []
for t in re.findall(r'\S+', os.environ['TOP']): r = Requirement(t); specs[canonicalize_name(r.name)] &= r.specifier; todo.append(canonicalize_name(r.name)); needed_by[canonicalize_name(r.name)].add('(top)')
image_reqs = collections.defaultdict(list)
while todo:
    n = todo.pop(0)
    if n in chosen and chosen[n] in specs[n]: continue
    pin = pins.get(n)
    req = f'{n}=={pin}' if pin and pin in specs[n] else f'{n}{specs[n]}'
    d = os.path.join(work, n); os.makedirs(d, exist_ok=True)
    for f in glob.glob(d + '/*'): os.remove(f)
    subprocess.run(dl + ['-d', d, req], check=True)
    whl, = glob.glob(d + '/*.whl')
    ver = os.path.basename(whl).split('-')[1]
    chosen[n] = ver
    meta = next(x for x in zipfile.ZipFile(whl).namelist() if x.endswith('.dist-info/METADATA'))
    for line in zipfile.ZipFile(whl).read(meta).decode().splitlines():
        if not line.startswith('Requires-Dist:'): continue
        r = Requirement(line.split(':', 1)[1].strip())
        if r.marker and not r.marker.evaluate(env): continue
        m = canonicalize_name(r.name)
        if m in image: image_reqs[m].append(f'{n} needs {r.name}{r.specifier or ""}'); continue
        specs[m] &= r.specifier; needed_by[m].add(n); todo.append(m)
print(f'\n{"package":26} {"version":12} {"pinned":10} needed by')
for n in sorted(chosen): print(f'{n:26} {chosen[n]:12} {"yes" if pins.get(n) == chosen[n] else "NO: " + str(pins.get(n)):10} {", ".join(sorted(needed_by[n]))}')
extra, missing = set(pins) - set(chosen), set(chosen) - set(pins)
print('\npinned but not needed:', sorted(extra) or 'none'); print('needed but not pinned:', sorted(missing) or 'none')
print('\nrequirements on image packages (checked where the image version is known; the rest: `pip check` on the GPU machine):')
bad = 0
for m in sorted(image_reqs):
    for s in sorted(set(image_reqs[m])):
        r = Requirement(s.split(' needs ')[1]); ok = '' if m not in known else ('ok' if known[m] in r.specifier else 'CONFLICT'); bad += ok == 'CONFLICT'
        print(f'  {s:60} image: {known.get(m, "?"):10} {ok}')
raise SystemExit(1 if extra or missing or bad else 0)
EOF
  echo; echo "cross-check with pip's own resolver (dry run for cp312; without bitsandbytes, whose torch==2.11 pins nvidia wheels"
  echo "that the index here may not serve; the image's huggingface-hub pinned):"
  echo 'huggingface-hub==1.33.0' > "$WORK/constraints.txt"
  # shellcheck disable=SC2086
  $PY -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --report "$WORK/report.json" --target "$WORK/x" \
    --python-version 3.12 --implementation cp --abi cp312 $PLATFORMS --only-binary=:all: -c "$WORK/constraints.txt" \
    $(echo "$TOP" | tr ' ' '\n' | grep -v '^bitsandbytes' | tr '\n' ' ') 2>&1 | grep -v "Location 'file" || true
  REPORT="$WORK/report.json" $PY - <<'EOF'
import json, os, re
canon = lambda n: re.sub(r'[-_.]+', '-', n).lower()
inst = {canon(i['metadata']['name']): i['metadata']['version'] for i in json.load(open(os.environ['REPORT']))['install']}
image = {canon(n) for n in os.environ['IMAGE'].split()}
pins = {canon(r.split('==')[0]): r.split('==')[1] for r in os.environ['PINS'].split()}
need = {n: v for n, v in inst.items() if n not in image}
for n in sorted(need): print(f'  {n:26} {need[n]:12} {"= pin" if pins.get(n) == need[n] else "pin: " + str(pins.get(n))}')
print('  pinned, not in this set:', sorted(set(pins) - set(need) - {'bitsandbytes'}) or 'none',
      '(tzdata: a dependency of pandas, which the image brings with its own pandas)' if 'tzdata' in need else '')
EOF
  ;;
--check)
  PY312=${PY312:-$(ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || true)}
  [ -x "$PY312" ] || { echo "--check needs a python3.12 (set PY312)"; exit 2; }
  [ -d "$DEST" ] || { echo "run bench/carry_wheels.sh first"; exit 2; }
  V=$(mktemp -d); trap 'rm -rf "$V"' EXIT
  "$PY312" -m venv "$V/venv"
  # the image packages these wheels import (unpinned except where KINDS.md gives the image's version)
  "$V/venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: numpy==2.5.2 huggingface-hub==1.33.0 \
    packaging pyyaml filelock fsspec pandas pyarrow requests httpx tqdm xxhash psutil pygments six setuptools build matplotlib
  cd "$V"   # as on the GPU machine: the repo root holds .whl/
  ln -s "$DEST" .whl
  set -x
  "$V/venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-check .whl/*.whl
  set +x
  PYTHONPATH=/tmp/site-check "$V/venv/bin/python" -c '
import importlib, sys
for m in ["nbdev", "nbdev.test", "execnb.nbio", "execnb.shell", "fastcore.script", "IPython", "datasets", "rapidfuzz", "ghapi.all"]:
    importlib.import_module(m); print("import", m, "ok")
import nbdev, datasets, rapidfuzz, IPython; print("versions: nbdev", nbdev.__version__, "datasets", datasets.__version__, "rapidfuzz", rapidfuzz.__version__, "IPython", IPython.__version__)
from execnb.shell import CaptureShell
s = CaptureShell(); s.run_cell("import math; x = math.sqrt(16)"); assert s.user_ns["x"] == 4.0, s.user_ns.get("x")
print("execnb CaptureShell runs a cell: ok")'
  echo "--- pip check (conflicts with the unpinned image stand-ins are expected to differ on the image):"
  PYTHONPATH=/tmp/site-check "$V/venv/bin/python" -m pip check --disable-pip-version-check || true
  ls /tmp/site-check/bin/ | tr '\n' ' '; echo
  rm -rf /tmp/site-check
  ;;
download)
  rm -rf "$DEST"; mkdir -p "$DEST"
  # shellcheck disable=SC2086
  $PIPDL -d "$DEST" $PINS
  # bitsandbytes: keep only the native libraries for the image's torch (43 MB -> ~4 MB); RECORD rewritten to match.
  B=$(ls "$DEST"/bitsandbytes-*.whl)
  KEEP="$KEEP_BNB_LIBS" $PY - "$B" <<'EOF'
import os, sys, zipfile, re
src = sys.argv[1]; keep = os.environ['KEEP'].split(); tmp = src + '.tmp'
drop = lambda n: re.fullmatch(r'bitsandbytes/libbitsandbytes_(\w+)\.so', n) and re.fullmatch(r'bitsandbytes/libbitsandbytes_(\w+)\.so', n)[1] not in keep
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_DEFLATED) as zo:
    kept = [i for i in zi.infolist() if not drop(i.filename)]
    for i in kept:
        data = zi.read(i.filename)
        if i.filename.endswith('.dist-info/RECORD'):
            data = '\n'.join(l for l in data.decode().splitlines() if not drop(l.split(',')[0])).encode() + b'\n'
        zo.writestr(i, data)
    libs = sorted(i.filename.split('/')[-1] for i in kept if '.so' in i.filename)
os.replace(tmp, src); print(f'bitsandbytes stripped to {libs}')
EOF
  mkdir -p "$DEST/qwen2.5-tokenizer"
  cp "$TOKENIZER_SRC"/{vocab.json,merges.txt,tokenizer_config.json} "$DEST/qwen2.5-tokenizer/"
  chmod u+w "$DEST/qwen2.5-tokenizer"/*
  echo; echo "wheels in $DEST:"
  (cd "$DEST" && ls -l *.whl | awk '{printf "  %8.2f MB  %s\n", $5/1e6, $9}')
  n=$(ls "$DEST"/*.whl | wc -l)
  whl=$(cat "$DEST"/*.whl | wc -c); tok=$(du -cb "$DEST/qwen2.5-tokenizer" | tail -1 | cut -f1)
  tree=$(cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | awk '$2=="total"{s+=$1} END{print s+0}')
  total=$((whl + tok + tree))
  printf '%d wheels %.1f MiB + tokenizer %.1f MiB + working tree %.1f MiB (tracked + untracked-not-ignored) = %.1f MiB of 64 MiB\n' \
    "$n" "$(echo "$whl/1048576" | bc -l)" "$(echo "$tok/1048576" | bc -l)" "$(echo "$tree/1048576" | bc -l)" "$(echo "$total/1048576" | bc -l)"
  [ "$total" -lt $((62 * 1048576)) ] || { echo "TOO LARGE for one run call (64 MiB)"; exit 1; }
  if git -C "$ROOT" check-ignore -q .whl/x.whl; then echo ".whl/ is ignored by git: ok"
  else echo "add the ignore line first:  echo /.whl/ >> $(git -C "$ROOT" rev-parse --git-common-dir)/info/exclude"; fi
  cat <<EOF

On the GPU machine (run tool: carry [".whl"]), start the command with:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . && export PYTHONPATH=\$PWD:/tmp/site PATH=/tmp/site/bin:\$PATH || exit 1; python3 -c 'import bitsandbytes, nbdev, datasets, rapidfuzz' || exit 1;
EOF
  ;;
*) echo "usage: $0 [--resolve|--check]"; exit 2;;
esac
