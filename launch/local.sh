#!/usr/bin/env bash
# Multi-host rehearsal on this machine: N processes with CPU devices and gloo collectives, each running
# `llama-jax preflight --then-train` exactly as a pod host does. A thin wrapper around launch/local.py.
#
#   launch/local.sh --processes 2 --devices-per-process 4 --config configs/debug-cpu.yaml --set run_dir=/tmp/r2
#
# PYTHON picks the interpreter (default python3, which must have the project's dependencies).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m llama_jax_launch.local "$@"
