# Sourced by tests/run.sh and tests/demo.sh: installs, on first use, what building ftx needs
# (a project venv holding PyTorch 2.11.0 from PyPI, whose libtorch tch links against) and
# exports the variables the build and the binary read. Later runs find it in place and return.
set -euo pipefail
FTX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FTX_VENV="${FTX_VENV:-$FTX_ROOT/.venv}"
TORCH_VERSION=2.11.0
# libtorch_cpu.so links the CUDA runtime and CUPTI even on a CPU machine: bring those two
# small wheels and no other CUDA library (the GPU machine has its own full PyTorch).
TORCH_RUNTIME_WHEELS="nvidia-cuda-cupti==13.0.85 nvidia-cuda-runtime==13.0.96"

# install_once NAME VERSION WHY PIP_ARGS…: pip-installs PIP_ARGS into the venv unless the marker
# file .ftx-NAME-VERSION there says an earlier run did (WHY: what for, said on that first run).
install_once() {
  local marker="$FTX_VENV/.ftx-$1-$2" why="$3"
  shift 3
  [ -f "$marker" ] && return 0
  echo "ftx: first run: installing $* into $FTX_VENV ($why)" >&2
  "$FTX_VENV/bin/pip" install --quiet --disable-pip-version-check --no-warn-conflicts "$@"
  touch "$marker"
}

[ -f "$FTX_VENV/.ftx-torch-$TORCH_VERSION" ] || python3 -m venv "$FTX_VENV"
install_once torch "$TORCH_VERSION" "what ftx builds against, about a minute" \
  --no-deps "torch==$TORCH_VERSION" $TORCH_RUNTIME_WHEELS
# The `openai` Python client, which the serve tests point at `ftx serve` (pulls httpx, pydantic).
install_once openai 3.57.0 "client for the serve tests" "openai==3.57.0"
# The GGUF tests read exported files back with llama.cpp's Python reader (gguf-py).
install_once gguf 0.19.0 "GGUF export tests" "gguf==0.19.0" numpy
# The tracking tests read TensorBoard event files back with TensorBoard's own EventAccumulator:
# tensorboard without its server's dependencies, plus what the reader imports.
install_once tensorboard 2.20.0 "reader only, tracking tests" \
  --no-deps "tensorboard==2.20.0" "protobuf==6.33.1" "absl-py==2.5.1" numpy
# huggingface_hub: the reference the Hub tests hold ftx's cache layout and the loopback Hub's
# upload endpoints to (tests/hub.rs).
install_once hfhub 1.33.0 "reference client for the Hub tests" "huggingface_hub==1.33.0"

# NVRTC (the CUDA runtime compiler, the version PyTorch 2.11's CUDA 13 wheels pin): the tests
# compile ftx's fused CUDA kernels to PTX with it, which needs no GPU (ftx-kernels' cuda tests).
install_once nvrtc 13.0.88 "fused-kernel compile tests" --no-deps "nvidia-cuda-nvrtc==13.0.88"

FTX_SITE="$(ls -d "$FTX_VENV"/lib/python3*/site-packages | head -n1)"
# `.libtorch`: a stable path to the venv's torch (whatever its Python version), which
# .cargo/config.toml gives plain cargo commands as LIBTORCH. The same value here, so a shell
# that sourced this file and one that did not build the same thing (no torch-sys rebuild).
ln -sfn "$FTX_SITE/torch" "$FTX_ROOT/.libtorch"
export LIBTORCH="${LIBTORCH:-$FTX_ROOT/.libtorch}"
export LD_LIBRARY_PATH="$LIBTORCH/lib:$FTX_SITE/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Two cores: keep libtorch from oversubscribing them when tests run in parallel.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "ftx: first run: adding the wasm32-wasip2 target (plugins build as WASM components)" >&2
  rustup target add wasm32-wasip2 >&2
fi
