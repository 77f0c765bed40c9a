#!/usr/bin/env bash
# Unsloth for the benchmark's `unsloth@...` rows on the GPU machine (no network there, and Unsloth is not on its image).
#
# Unpacks into <repo>/.unsloth/site/ the pure-Python packages Unsloth needs at import time that the image lacks
# (unsloth, unsloth_zoo, trl), without Unsloth's `studio/` web UI and `unsloth_cli/` (82 MB unpacked, never imported by
# training), and writes .unsloth/env.sh: PYTHONPATH and the variables that keep Unsloth off the network. 23 MB, carried
# beside .whl/ (bench/carry_wheels.sh). Left out on purpose: xformers (Unsloth falls back to torch's attention),
# cut_cross_entropy, torchao, hf_transfer, diffusers (imported only inside try blocks or for features not used here).
#
#   bench/carry_unsloth.sh                                     # here, with PyPI
#   source .unsloth/env.sh                                      # on the GPU machine, after the .whl/ install line
#   python3 -m qlora_nb.bench --preset 7B --tokenizer .whl/qwen2.5-tokenizer --rows unsloth@fixed,fast-12GiB@fixed
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DEST=$ROOT/.unsloth
PY=${PYTHON:-python3}
rm -rf "$DEST" && mkdir -p "$DEST/site" "$DEST/wheels"
grep -qx '/.unsloth/' "$ROOT/.git/info/exclude" || echo '/.unsloth/' >> "$ROOT/.git/info/exclude"
"$PY" -m pip download -q --no-deps -d "$DEST/wheels" unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0
for w in "$DEST"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$DEST/site"; done
rm -rf "$DEST/wheels" "$DEST/site/studio" "$DEST/site/unsloth_cli"
cat > "$DEST/env.sh" <<'ENV'
# Source from the repo root on the GPU machine, after the /tmp/site wheel install.
export PYTHONPATH="$PWD/.unsloth/site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache UNSLOTH_DISABLE_CPU_FALLBACK=1
ENV
du -sh "$DEST"
