#!/usr/bin/env bash
# Cloud TPU slice launcher: a thin wrapper around launch/tpu_pod.py (standard library + gcloud only).
#
#   launch/tpu_pod.sh up --project P --zone us-east5-a --accelerator-type v5p-32 --config configs/my-run.yaml \
#       --set run_dir=gs://my-bucket/runs/my-run    # checkpoints and metrics straight to Cloud Storage
#   launch/tpu_pod.sh up ... --dry-run     # print every gcloud command, run none
#   launch/tpu_pod.sh logs|stop|delete --project P --zone Z --accelerator-type v5p-32
#
# PYTHON picks the interpreter (default python3); see launch/README.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m llama_jax_launch.tpu_pod "$@"
