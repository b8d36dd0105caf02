#!/usr/bin/env bash
# One venv per peer for bench/peers.py (their redis-py pins conflict): .venv-peers/<peer>.
set -euo pipefail
cd "$(dirname "$0")/../.."
declare -A PKGS=([arq]="arq==0.28.0" [celery]="celery[redis]==5.7.0" [taskiq]="taskiq==0.13.0 taskiq-redis==1.2.4")
for peer in "${!PKGS[@]}"; do
  [ -x ".venv-peers/$peer/bin/python" ] && continue
  python3 -m venv ".venv-peers/$peer"
  # shellcheck disable=SC2086
  ".venv-peers/$peer/bin/pip" install -q ${PKGS[$peer]} &
done
wait
