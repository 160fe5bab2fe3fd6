#!/usr/bin/env python3
"""Drives the dashboard in a headless Chromium over the DevTools protocol
while a scenario runs through the control API (see dashboard-check.sh).

    python3 scripts/dashboard_cdp.py CHROMIUM BASE_URL OUT_DIR

Standard library only (the WebSocket client is the few lines the DevTools
protocol needs). Exits non-zero, saying why, if the page throws a
JavaScript error, if its model table does not list the resident models
after an eviction, or if no event line appears.
"""

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


class DevTools:
    """A WebSocket connection to one page's DevTools endpoint."""

    def __init__(self, url):
        host_port, path = url[len("ws://"):].split("/", 1)
        host, port = host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(4096)
        head, self.pending = answer.split(b"\r\n\r\n", 1)
        expected = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        if b" 101 " not in head.split(b"\r\n")[0] or expected.encode() not in head:
            fail(f"DevTools refused the WebSocket: {head[:200]!r}")
        self.next_id = 0
        self.events = []

    def _read(self, n):
        while len(self.pending) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                fail("DevTools closed the connection")
            self.pending += chunk
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    def _frame(self):
        first, second = self._read(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack(">H", self._read(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self._read(8))[0]
        return first & 0x0F, first & 0x80, self._read(length)

    def _message(self):
        parts = []
        while True:
            opcode, last, payload = self._frame()
            if opcode == 8:
                fail("DevTools closed the WebSocket")
            if opcode in (0, 1, 2):
                parts.append(payload)
                if last:
                    return json.loads(b"".join(parts))

    def call(self, method, **params):
        self.next_id += 1
        body = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(body) < 126:
            header += bytes([0x80 | len(body)])
        elif len(body) < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(body))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(body))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
        self.sock.sendall(header + mask + masked)
        while True:
            message = self._message()
            if message.get("id") == self.next_id:
                if "error" in message:
                    fail(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def errors(self):
        """JavaScript errors seen so far: exceptions and console errors."""
        found = []
        for event in self.events:
            if event.get("method") == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text"))
            if event.get("method") == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in event["params"]["args"]))
        count = self.evaluate("document.body ? (document.body.dataset.jsErrors || '0') : '0'")
        if count not in ("0", None):
            found.append(self.evaluate("document.getElementById('errors').textContent"))
        return found

    def pump(self, seconds):
        """Lets the page run for `seconds`, collecting events."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            self.evaluate("1")
            time.sleep(0.1)

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as out:
            out.write(base64.b64decode(data))
        print(f"screenshot: {path}")


def api(base, path, method="GET"):
    request = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as e:
        return json.load(e)


def wait_for(page, expression, what, seconds=15):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if page.evaluate(expression):
            return
        time.sleep(0.1)
    fail(f"the page never showed {what}")


def main():
    chromium, base, out = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3]
    os.makedirs(out, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="dashboard-check-")
    port_sock = socket.socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    browser = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "--window-size=1280,720",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        targets = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
                    targets = [t for t in json.load(answer) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        if not targets:
            fail("Chromium's DevTools never answered")
        page = DevTools(targets[0]["webSocketDebuggerUrl"])
        page.call("Runtime.enable")
        page.call("Page.enable")
        page.call("Emulation.setDeviceMetricsOverride", width=1280, height=720, deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=base + "/")

        # Before: the first models loaded, the page shows them.
        for model in ("whisper", "kokoro", "llama-8b"):
            answer = api(base, f"/api/models/{model}/load", "POST")
            if "error" in answer:
                fail(f"loading {model}: {answer}")
        wait_for(page, "document.querySelectorAll('#models tr[data-state=resident]').length === 3",
                 "three resident models")
        wait_for(page, "document.querySelectorAll('#events li').length > 0", "an event line")
        page.pump(1.5)
        page.screenshot(os.path.join(out, "before.png"))

        # The eviction: the 10 GiB LLM needs the 6 GiB one's room.
        answer = api(base, "/api/models/qwen-14b/load", "POST")
        if answer.get("evicted") != ["llama-8b"]:
            fail(f"expected qwen-14b to evict llama-8b, got {answer}")
        wait_for(page, "[...document.querySelectorAll('#events li')].some(li => li.dataset.event === 'evicted')",
                 "the eviction in the event log")
        page.pump(1.5)
        resident = sorted(m["id"] for m in api(base, "/api/status")["models"] if m["state"] == "resident")
        shown = sorted(page.evaluate(
            "[...document.querySelectorAll('#models tr[data-state=resident]')].map(r => r.dataset.model)") or [])
        if shown != resident:
            fail(f"the table shows resident {shown}, the server says {resident}")
        print(f"ok: the table lists the resident models {shown}")
        lines = page.evaluate("[...document.querySelectorAll('#events li')].map(li => li.textContent)")
        print(f"ok: {len(lines)} event lines, newest: {lines[0]!r}")
        page.screenshot(os.path.join(out, "after.png"))

        # A button: pin kokoro from the page, as a user would.
        page.evaluate("[...document.querySelectorAll('#models tr')].find(r => r.dataset.model === 'kokoro')"
                      ".querySelectorAll('button')[1].click()")
        wait_for(page,
                 "[...document.querySelectorAll('#models tr')].some(r => r.dataset.model === 'kokoro' && "
                 "r.children[7].textContent === 'yes')", "kokoro pinned after its Pin button")
        print("ok: the Pin button pinned kokoro")

        # A phone-width screen.
        page.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=1, mobile=True)
        page.pump(1.5)
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 420:
            fail(f"at phone width the page is {width}px wide")
        page.screenshot(os.path.join(out, "phone.png"))

        errors = page.errors()
        if errors:
            fail(f"JavaScript errors: {errors}")
        print("ok: no JavaScript error")
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()


if __name__ == "__main__":
    main()
