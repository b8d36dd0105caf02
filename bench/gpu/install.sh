#!/usr/bin/env bash
# On the device: join split wheels gathered in /tmp/w/<set>, install a set into /tmp/site-<set>.
#   bash bench/gpu/install.sh vllm     -> PYTHONPATH=/tmp/site-vllm:/tmp/site-vlmq
set -euo pipefail
set_name=$1; dir=/tmp/w/$set_name
cd "$dir"
for first in split-*.00; do
  [ -e "$first" ] || continue
  base=${first%.00}; cat "$base".[0-9][0-9] > "${base#split-}"; rm -f "$base".[0-9][0-9]
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "/tmp/site-$set_name" "$dir"/*.whl
echo "installed $set_name: $(ls "$dir"/*.whl | wc -l) wheels"
