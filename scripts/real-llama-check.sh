#!/usr/bin/env bash
# A real client against real model servers: `vram-manager serve` in front of
# two llama.cpp servers (llama-cpp-python's, built from the llama.cpp source
# that package ships) loading tiny random-weight LLaMA models written by
# scripts/make_tiny_gguf.py, driven by the official `openai` Python client
# (scripts/real_llama_client.py). No GPU and no model download.
#
#   scripts/real-llama-check.sh              # fails when it cannot run
#   scripts/real-llama-check.sh --if-possible  # skips, saying why, instead
#
# It installs what it needs into target/real-llama/venv (kept for the next
# run): pip install "llama-cpp-python[server]" gguf openai. The first run
# compiles llama.cpp (minutes on a small machine).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/common.sh real-llama-check "$@"

command -v python3 >/dev/null || skip "python3 is not installed"
python3 -c 'import venv, ensurepip' 2>/dev/null || skip "python3 lacks venv/ensurepip"
command -v cc >/dev/null || command -v gcc >/dev/null || skip "no C compiler to build llama.cpp"
command -v c++ >/dev/null || command -v g++ >/dev/null || skip "no C++ compiler to build llama.cpp"

work=target/real-llama
venv=$work/venv
mkdir -p "$work"
if ! "$venv/bin/python" -c 'import llama_cpp.server, gguf, openai' 2>/dev/null; then
    echo "real-llama-check: installing llama-cpp-python[server], gguf, openai into $venv (compiles llama.cpp)"
    python3 -m venv "$venv"
    if ! CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --quiet \
        "llama-cpp-python[server]" gguf openai >"$work/pip.log" 2>&1; then
        tail -20 "$work/pip.log" >&2
        skip "pip could not install llama-cpp-python[server], gguf and openai (log: $work/pip.log)"
    fi
fi
py=$venv/bin/python

cargo build --quiet --bin vram-manager
target_dir=$(target_dir)
manager=$target_dir/debug/vram-manager

"$py" scripts/make_tiny_gguf.py "$work/tiny-a.gguf" --seed 1
"$py" scripts/make_tiny_gguf.py "$work/tiny-b.gguf" --seed 2

port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_a=$(port); port_b=$(port); listen=$(port)
server() { # NAME PORT
    printf '["%s", "-m", "llama_cpp.server", "--model", "%s", "--model_alias", "%s", "--host", "127.0.0.1", "--port", "%s", "--n_ctx", "512"]' \
        "$py" "$work/$1.gguf" "$1" "$2"
}
cat >"$work/serve.toml" <<TOML
# Two real llama.cpp servers on a simulated 1 GiB card: each declares
# 700 MiB, so one must leave for the other.
[gpu]
probe = "none"
total = "1GiB"

[[models]]
id = "tiny-a"
kind = "llm"
vram = "700MiB"
backend = "process"
command = $(server tiny-a "$port_a")
ready = "http://127.0.0.1:$port_a/v1/models"
ready_timeout = "60s"

[[models]]
id = "tiny-b"
kind = "llm"
vram = "700MiB"
backend = "process"
command = $(server tiny-b "$port_b")
ready = "http://127.0.0.1:$port_b/v1/models"
ready_timeout = "60s"
TOML

"$manager" check-config "$work/serve.toml" >/dev/null
"$manager" serve "$work/serve.toml" --listen "127.0.0.1:$listen" 2>"$work/serve.log" &
serve_pid=$!
cleanup() { kill "$serve_pid" 2>/dev/null || true; }
trap cleanup EXIT

base="http://127.0.0.1:$listen"
for _ in $(seq 100); do
    curl -fsS "$base/health" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "$base/health" >/dev/null || { cat "$work/serve.log" >&2; echo "serve did not start" >&2; exit 1; }

if ! "$py" scripts/real_llama_client.py "$base" tiny-a tiny-b; then
    echo "--- serve's log" >&2
    tail -40 "$work/serve.log" >&2
    exit 1
fi

# SIGTERM stops serve and every model server it started.
kill -TERM "$serve_pid"
status=0
wait "$serve_pid" || status=$?
trap - EXIT
for p in "$port_a" "$port_b"; do
    if curl -fsS "http://127.0.0.1:$p/v1/models" >/dev/null 2>&1; then
        echo "FAIL: a llama.cpp server still answers on port $p after serve stopped" >&2
        exit 1
    fi
done
echo "ok: serve exited with $status on SIGTERM and no llama.cpp server is left"
echo "real-llama-check: passed"
