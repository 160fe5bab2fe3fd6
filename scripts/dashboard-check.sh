#!/usr/bin/env bash
# The dashboard in real browsers: starts `vram-manager serve` on a
# simulated card, opens http://HOST/ in headless Chromium (Debian's
# `chromium`, installed when missing and apt-get can) and then, when it is
# installed, headless Firefox; drives a scenario through the control API
# while the page is open, and saves screenshots before and after an
# eviction (and at phone width) into target/dashboard-check/BROWSER/.
# Fails on a JavaScript error, a model table that does not list the
# resident models after the eviction, or no event line.
#
#   scripts/dashboard-check.sh              # fails when it cannot run
#   scripts/dashboard-check.sh --if-possible  # skips, saying why, instead
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/common.sh dashboard-check "$@"

command -v python3 >/dev/null || skip "python3 is not installed"
chromium=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$chromium" ]]; then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        echo "dashboard-check: installing chromium"
        apt-get install -y chromium >/dev/null 2>&1 || skip "apt-get could not install chromium"
        chromium=$(command -v chromium || true)
    fi
    [[ -n "$chromium" ]] || skip "no Chromium, and no way to install it here"
fi

out=target/dashboard-check
mkdir -p "$out"
cargo build --quiet --bin vram-manager
target_dir=$(target_dir)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$out/serve.toml" <<'TOML'
# A 16 GiB card with 1 GiB kept back; the voice stack plus two LLMs that do
# not fit together.
[gpu]
probe = "none"
total = "17GiB"
reserve = "1GiB"

[kinds.tts]
priority = 1
ttl = "10m"

[[models]]
id = "whisper"
kind = "asr"
vram = "3GiB"
load_ms = 200

[[models]]
id = "kokoro"
kind = "tts"
vram = "1GiB"
load_ms = 100

[[models]]
id = "llama-8b"
kind = "llm"
vram = "6GiB"
load_ms = 300

[[models]]
id = "qwen-14b"
kind = "llm"
vram = "10GiB"
load_ms = 500
TOML
# `restart.sh` stops serve and starts it again on the same port: the page
# must notice and reconnect by itself.
cat >"$out/restart.sh" <<SH
#!/usr/bin/env bash
if [[ -f "$out/serve.pid" ]]; then
    pid=\$(cat "$out/serve.pid")
    kill \$pid 2>/dev/null || true
    while kill -0 \$pid 2>/dev/null; do sleep 0.05; done
fi
"$target_dir/debug/vram-manager" serve "$out/serve.toml" --listen "127.0.0.1:$port" 2>>"$out/serve.log" &
echo \$! >"$out/serve.pid"
for _ in \$(seq 100); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && exit 0
    sleep 0.1
done
exit 1
SH
chmod +x "$out/restart.sh"
rm -f "$out/serve.pid"
trap 'kill $(cat "$out/serve.pid" 2>/dev/null) 2>/dev/null || true' EXIT
"$out/restart.sh" || { cat "$out/serve.log" >&2; echo "serve did not start" >&2; exit 1; }
export DASHBOARD_RESTART="$out/restart.sh"
python3 scripts/dashboard_browser.py chromium "$chromium" "http://127.0.0.1:$port" "$out"
firefox=$(command -v firefox-esr || command -v firefox || true)
if [[ -n "$firefox" ]]; then
    python3 scripts/dashboard_browser.py firefox "$firefox" "http://127.0.0.1:$port" "$out"
else
    echo "dashboard-check: Firefox skipped: not installed (apt-get install firefox-esr)"
fi
echo "dashboard-check: passed (screenshots in $out)"
