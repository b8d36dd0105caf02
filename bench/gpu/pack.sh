#!/usr/bin/env bash
# Pack .whl/<set>/ into pieces of at most 58 MiB (.whl/pieces/<set>-NN/), one per device call:
# a call carries 64 MiB at most. Wheels over the limit are split (joined again by install.sh).
# TurboMind's CUDA 12 library is taken out of the "lmdeploy" set's wheel (the device has CUDA 13;
# LMDeploy then runs its PyTorch engine); the "turbomind" set keeps it (turbomind.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
LIMIT=$((58 * 1024 * 1024))
python3 -m pip wheel -q --no-deps -w .whl/vlmq . >/dev/null
lm=$(ls .whl/lmdeploy/lmdeploy-*.whl 2>/dev/null || true)
if [ -n "$lm" ]; then
  python3 - "$lm" <<'PY'
import shutil, sys, zipfile
src = sys.argv[1]; tmp = src + ".tmp"
drop = lambda name: "_turbomind" in name or "turbomind/lib64/" in name
with zipfile.ZipFile(src) as zin:
    if not any(drop(n) for n in zin.namelist()):
        sys.exit(0)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if drop(item.filename):
                continue
            data = zin.read(item.filename)
            if item.filename.endswith("RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if not drop(l.decode()))
            zout.writestr(item, data)
shutil.move(tmp, src)
PY
fi
rm -rf .whl/pieces && mkdir -p .whl/pieces
for set in "$@"; do
  n=0; size=$LIMIT
  for w in $(ls -S .whl/$set/*.whl); do
    s=$(stat -c %s "$w")
    if [ "$s" -gt "$LIMIT" ]; then
      split -b $LIMIT -d -a 2 "$w" ".whl/pieces/split-$(basename "$w")."
      for part in .whl/pieces/split-$(basename "$w").*; do
        n=$((n + 1)); d=.whl/pieces/$set-$(printf %02d $n); mkdir -p "$d"; mv "$part" "$d/"
      done
      size=$LIMIT; continue
    fi
    if [ $((size + s)) -gt "$LIMIT" ]; then n=$((n + 1)); size=0; fi
    d=.whl/pieces/$set-$(printf %02d $n); mkdir -p "$d"; cp "$w" "$d/"; size=$((size + s))
  done
done
# The sweep (sweep.sh first) needs, beside vLLM, only these of vlmq's set: they ride in
# vLLM's last piece, so its images are made on the device while the other pieces travel.
last=$(ls -d .whl/pieces/vllm-* 2>/dev/null | tail -1 || true)
if [ -n "$last" ] && [ -d .whl/vlmq ]; then
  for w in msgspec structlog redis hiredis; do cp .whl/vlmq/"$w"-[0-9]*.whl "$last"/; done
fi
du -sh .whl/pieces/* | sort -k2
