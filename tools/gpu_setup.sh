#!/usr/bin/env bash
# Run tools/gpu_check.py on a GPU machine that has torch but not the package's other dependencies and no internet
# (the lent H200: Python 3.12, torch 2.11 + CUDA 13, transformers, triton, safetensors; no deepspeed, hydra-core,
# omegaconf, webdataset). The wheels are fetched here and carried there.
#
#   tools/gpu_setup.sh download [DIR]      # here, with internet: wheels for CPython 3.12 x86-64 into DIR (.whl)
#   tools/gpu_setup.sh run [DIR] -- ARGS   # there: install DIR's wheels and this checkout into /tmp/site, then
#                                          # python3 tools/gpu_check.py ARGS
#   tools/gpu_setup.sh install [DIR]       # there: only the install; then export PYTHONPATH=/tmp/site
#
# deepspeed and antlr4 come from PyPI as source only: `download` builds them into pure-Python wheels here (no CUDA
# ops are built; DeepSpeed compiles what it needs, if anything, on first use there). flash-attn has no wheel on
# PyPI, so the check runs without it and says so; liger-kernel (the gpu extra's fused loss) is carried.
set -euo pipefail
cd "$(dirname "$0")/.."

SITE=/tmp/site
WHEELS=(
  hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
  hjson==3.1.0 liger-kernel==0.8.5
)
SOURCES=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)

command=${1:-}
dir=${2:-.whl}
[[ "$dir" == "--" ]] && dir=.whl

case "$command" in
  download)
    mkdir -p "$dir"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dir" "${WHEELS[@]}"
    python3 -m pip wheel --no-deps -w "$dir" "${SOURCES[@]}"
    ls -l "$dir"
    ;;
  install | run)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$dir"/*.whl
    # The package itself (its Hydra configs ship inside it as vlm_train.conf), built with the setuptools there.
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" .
    export PYTHONPATH="$SITE"
    if [[ "$command" == run ]]; then
      shift $(($# >= 2 ? 2 : $#))
      [[ "${1:-}" == "--" ]] && shift
      exec python3 tools/gpu_check.py "$@"
    fi
    echo "installed into $SITE: export PYTHONPATH=$SITE"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
    ;;
esac
