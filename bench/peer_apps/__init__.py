"""The peers of bench/peers.py: one app per job queue, each run in its own venv
(`bash bench/peer_apps/venvs.sh`; arq pins redis<6, taskiq-redis wants redis>=6)."""
