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

if [ ! -f "$FTX_VENV/.ftx-torch-$TORCH_VERSION" ]; then
  echo "ftx: first run: installing torch==$TORCH_VERSION into $FTX_VENV (about a minute)" >&2
  python3 -m venv "$FTX_VENV"
  "$FTX_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    "torch==$TORCH_VERSION" $TORCH_RUNTIME_WHEELS
  touch "$FTX_VENV/.ftx-torch-$TORCH_VERSION"
fi

# The `openai` Python client, which the serve tests point at `ftx serve` (pulls httpx, pydantic).
OPENAI_VERSION=3.57.0
if [ ! -f "$FTX_VENV/.ftx-openai-$OPENAI_VERSION" ]; then
  echo "ftx: first run: installing openai==$OPENAI_VERSION into $FTX_VENV (client for the serve tests)" >&2
  "$FTX_VENV/bin/pip" install --quiet --disable-pip-version-check --no-warn-conflicts "openai==$OPENAI_VERSION"
  touch "$FTX_VENV/.ftx-openai-$OPENAI_VERSION"
fi
# The GGUF tests read exported files back with llama.cpp's Python reader (gguf-py).
GGUF_PY_VERSION=0.19.0
if [ ! -f "$FTX_VENV/.ftx-gguf-$GGUF_PY_VERSION" ]; then
  echo "ftx: first run: installing gguf==$GGUF_PY_VERSION and numpy into $FTX_VENV (GGUF export tests)" >&2
  "$FTX_VENV/bin/pip" install --quiet --disable-pip-version-check --no-warn-conflicts "gguf==$GGUF_PY_VERSION" numpy
  touch "$FTX_VENV/.ftx-gguf-$GGUF_PY_VERSION"
fi

# The tracking tests read TensorBoard event files back with TensorBoard's own EventAccumulator:
# tensorboard without its server's dependencies, plus what the reader imports.
TENSORBOARD_VERSION=2.20.0
if [ ! -f "$FTX_VENV/.ftx-tensorboard-$TENSORBOARD_VERSION" ]; then
  echo "ftx: first run: installing tensorboard==$TENSORBOARD_VERSION (reader only) into $FTX_VENV (tracking tests)" >&2
  "$FTX_VENV/bin/pip" install --quiet --disable-pip-version-check --no-warn-conflicts --no-deps \
    "tensorboard==$TENSORBOARD_VERSION" "protobuf==6.33.1" "absl-py==2.5.1" numpy
  touch "$FTX_VENV/.ftx-tensorboard-$TENSORBOARD_VERSION"
fi
# huggingface_hub: the reference the Hub tests hold ftx's cache layout and the loopback Hub's
# upload endpoints to (tests/hub.rs).
HF_HUB_VERSION=1.33.0
if [ ! -f "$FTX_VENV/.ftx-hfhub-$HF_HUB_VERSION" ]; then
  echo "ftx: first run: installing huggingface_hub==$HF_HUB_VERSION into $FTX_VENV (reference client for the Hub tests)" >&2
  "$FTX_VENV/bin/pip" install --quiet --disable-pip-version-check --no-warn-conflicts "huggingface_hub==$HF_HUB_VERSION"
  touch "$FTX_VENV/.ftx-hfhub-$HF_HUB_VERSION"
fi

# NVRTC (the CUDA runtime compiler, the version PyTorch 2.11's CUDA 13 wheels pin): the tests
# compile ftx's fused CUDA kernels to PTX with it, which needs no GPU (ftx-kernels' cuda tests).
NVRTC_VERSION=13.0.88
if [ ! -f "$FTX_VENV/.ftx-nvrtc-$NVRTC_VERSION" ]; then
  echo "ftx: first run: installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $FTX_VENV (fused-kernel compile tests)" >&2
  "$FTX_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "nvidia-cuda-nvrtc==$NVRTC_VERSION"
  touch "$FTX_VENV/.ftx-nvrtc-$NVRTC_VERSION"
fi

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
