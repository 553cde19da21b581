#!/usr/bin/env bash
# Run tools/gpu_check.py on a GPU machine that has torch but not the package's other dependencies and no internet
# (the lent H200: Python 3.12, torch 2.11 + CUDA 13, transformers, triton, safetensors, pytest, torchvision; no av,
# deepspeed, hydra-core, omegaconf, webdataset). The wheels are fetched here and carried there.
#
#   tools/gpu_setup.sh download [DIR]        # here, with internet: wheels for CPython $GPU_PYTHON (default 3.12)
#                                            # x86-64 Linux into DIR (default .whl)
#   tools/gpu_setup.sh download-local [DIR]  # the same wheels for the Python running this script (a test, or a
#                                            # machine with internet)
#   tools/gpu_setup.sh run [DIR] -- ARGS     # there: install DIR's wheels and this checkout into $SITE (default
#                                            # /tmp/site), then run tools/gpu_check.py ARGS against that install
#   tools/gpu_setup.sh install [DIR]         # there: only the install; then export PYTHONPATH=$SITE
#
# DIR's top-level wheels are always installed; those in DIR/if-missing/ only where the machine has no distribution
# of that name, so that a GPU image's own numpy or pillow (what its torchvision was built against) is not shadowed
# while a bare Python still gets what gpu_check and DeepSpeed import. av (PyAV) is not needed: only video decoding
# imports it. deepspeed and antlr4 come from PyPI as source only: `download` builds them into pure-Python wheels
# here (no CUDA ops are built; DeepSpeed compiles what it needs, if anything, on first use there). flash-attn has no
# wheel on PyPI, so the check runs without it and says so; liger-kernel (the gpu extra's fused loss) is carried.
set -euo pipefail
cd "$(dirname "$0")/.."

SITE=${SITE:-/tmp/site}
GPU_PYTHON=${GPU_PYTHON:-3.12}
# The package's dependencies and DeepSpeed's pydantic 2 with its exact core (a pair that only works together).
WHEELS=(
  hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
  hjson==3.1.0 liger-kernel==0.8.5
)
# What the package (pillow, numpy, PyYAML), webdataset and DeepSpeed import that a torch + transformers image
# usually has already.
IF_MISSING=(
  pillow==13.0.0 numpy==2.4.6 pyyaml==6.0.4 packaging==26.4 tqdm==4.70.1
  psutil==7.2.2 py-cpuinfo==9.0.0 einops==0.8.2 msgpack==1.2.4
)
SOURCES=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)

command=${1:-}
dir=${2:-.whl}
[[ "$dir" == "--" ]] && dir=.whl

fetch() {  # fetch DIR [pip download's target flags]: the binary wheels, then the source-only ones built
  local into=$1
  shift
  mkdir -p "$into/if-missing"
  python3 -m pip download -q --no-deps --only-binary=:all: "$@" -d "$into" "${WHEELS[@]}"
  python3 -m pip download -q --no-deps --only-binary=:all: "$@" -d "$into/if-missing" "${IF_MISSING[@]}"
  python3 -m pip wheel -q --no-deps -w "$into" "${SOURCES[@]}"
  ls -l "$into" "$into/if-missing"
}

case "$command" in
  download)
    fetch "$dir" --python-version "$GPU_PYTHON" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    ;;
  download-local)
    fetch "$dir"
    ;;
  install | run)
    [[ -n "$(ls "$dir"/*.whl 2>/dev/null)" ]] || { echo "no wheels in $dir: run '$0 download $dir' first" >&2; exit 2; }
    wheels=("$dir"/*.whl)
    # A wheel's file name starts with its distribution's name; metadata lookups normalise - and _ and case alike.
    for wheel in "$dir"/if-missing/*.whl; do
      [[ -e "$wheel" ]] || continue
      name=$(basename "$wheel" | cut -d- -f1)
      python3 -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$name" 2>/dev/null ||
        wheels+=("$wheel")
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}"
    # The package itself (its Hydra configs ship inside it as vlm_train.conf), built with the setuptools there.
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" .
    export PYTHONPATH="$SITE"
    if [[ "$command" == run ]]; then
      shift $(($# >= 2 ? 2 : $#))
      [[ "${1:-}" == "--" ]] && shift
      # gpu_check runs pytest and torchrun in the folder above its tools/; there the checkout's vlm_train/ would come
      # first on sys.path and hide the installed one, whose configs (vlm_train.conf) only exist once installed. So it
      # runs from a copy of tools/ and tests/ without the package source.
      root=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_root.XXXXXX")
      cp -r tools tests pytest.ini "$root"
      exec python3 "$root/tools/gpu_check.py" "$@"
    fi
    echo "installed into $SITE: export PYTHONPATH=$SITE"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
    ;;
esac
