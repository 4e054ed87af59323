#!/usr/bin/env bash
# First contact on a machine without ../shared: the pretrained files arrive
# from a mirror (a loopback HTTP server standing in for the pinned URL), are
# checked by SHA-256 and cached; a corrupt mirror fails and caches nothing;
# the default RGB stage then starts from ImageNet.
#
#   bash experiments/first_contact.sh [MODELS_DIR] > experiments/results/first_contact.txt
#
# MODELS_DIR (default ../shared/data/models) holds the two .tflite files the
# mirror serves. Everything runs in a fresh clone under a temporary folder
# whose parent has no shared/ folder; nothing leaves the loopback.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
models="$(cd "${1:-$repo/../shared/data/models}" && pwd)"
tmp="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
git clone -q "$repo" "$tmp/clone/structvpr_jax"
mkdir -p "$tmp/good" "$tmp/corrupt"
for f in mobilenet_v2_1.0_224_quant.tflite deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite; do
  cp "$models/$f" "$tmp/good/$f"
  python - "$models/$f" "$tmp/corrupt/$f" <<'EOF'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[len(data) // 2] ^= 0xFF
open(sys.argv[2], "wb").write(bytes(data))
EOF
done
python -m http.server 8765 --bind 127.0.0.1 --directory "$tmp" >/dev/null 2>&1 &
sleep 1
cd "$tmp/clone/structvpr_jax"
export XDG_CACHE_HOME="$tmp/cache"
echo "== fresh clone: $(git log --oneline -1); ../shared exists: $(test -d ../shared && echo yes || echo no)"
echo "== corrupt mirror, empty cache"
set +e
STRUCTVPR_WEIGHTS_URL=http://127.0.0.1:8765/corrupt python -m structvpr_jax.weights fetch
echo "exit status $?; cache now: $(ls "$XDG_CACHE_HOME/structvpr_jax/weights" 2>/dev/null | wc -l) files"
set -e
echo "== good mirror"
export STRUCTVPR_WEIGHTS_URL=http://127.0.0.1:8765/good
python -m structvpr_jax.weights where
python -m structvpr_jax.weights fetch
(cd "$XDG_CACHE_HOME/structvpr_jax/weights" && sha256sum *.tflite)
echo "== default RGB stage (2 steps) starts from ImageNet"
python -m structvpr_jax.main --config=configs/rgb.py --workdir="$tmp/run" \
    --config.train.num_steps=2 --config.train.eval_every=2 2>&1 \
    | grep -E "starts from|\[rgb\] step 2 val" | head -5
python - "$tmp/run/rgb/done.json" <<'EOF'
import json, sys
done = json.load(open(sys.argv[1]))
print("rgb.init_resolved:", done["config"]["rgb.init_resolved"])
EOF
