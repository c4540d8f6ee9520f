#!/usr/bin/env bash
# Issue 16's GPU check for a person with one NVIDIA GPU: installs into .venv if needed, then runs
# scripts/gpu_check.py (environment, attention kernels, paper-size training steps, train/resume/sample,
# determinism, the benchmarks), writing gpu_check.md. `scripts/gpu_check.sh --toy` is a CPU dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory venv
exec .venv/bin/python scripts/gpu_check.py "$@"
