#!/usr/bin/env python3
"""Drives the dashboard in a headless browser while a scenario runs through
the control API (see dashboard-check.sh): Chromium over its DevTools
protocol, Firefox over WebDriver BiDi.

    python3 scripts/dashboard_browser.py chromium|firefox BINARY BASE_URL OUT_DIR

Standard library only (the WebSocket client is the few lines both protocols
need). Exits non-zero, saying why, if the page throws a JavaScript error,
if its model table does not list the resident models after an eviction, or
if no event line appears.
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


class Socket:
    """A WebSocket connection speaking JSON commands (`id`, `method`,
    `params`) and answers, as both DevTools and WebDriver BiDi do."""

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
                    fail(f"{method}: {message['error']} {message.get('message', '')}")
                return message.get("result", {})
            self.events.append(message)


class Page:
    """What the check does with a page, whichever the browser."""

    def pump(self, seconds):
        """Lets the page run for `seconds`, collecting events."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            self.evaluate("1")
            time.sleep(0.1)

    def page_errors(self):
        """Errors the page caught itself (window.onerror and rejections)."""
        count = self.evaluate("document.body ? (document.body.dataset.jsErrors || '0') : '0'")
        if count not in ("0", None):
            return [self.evaluate("document.getElementById('errors').textContent")]
        return []

    def screenshot(self, path):
        with open(path, "wb") as out:
            out.write(base64.b64decode(self.png()))
        print(f"screenshot: {path}")


class Chromium(Page):
    """A Chromium page over the DevTools protocol."""

    def __init__(self, url):
        self.socket = Socket(url)
        self.socket.call("Runtime.enable")
        self.socket.call("Page.enable")

    def navigate(self, url):
        self.socket.call("Page.navigate", url=url)

    def size(self, width, height, mobile):
        self.socket.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                         deviceScaleFactor=1, mobile=mobile)

    def evaluate(self, expression):
        result = self.socket.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def png(self):
        return self.socket.call("Page.captureScreenshot", format="png")["data"]

    def errors(self):
        """JavaScript errors seen so far: exceptions and console errors."""
        found = []
        for event in self.socket.events:
            if event.get("method") == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text"))
            if event.get("method") == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in event["params"]["args"]))
        return found + self.page_errors()


class Firefox(Page):
    """A Firefox page over WebDriver BiDi."""

    def __init__(self, url):
        self.socket = Socket(url)
        self.socket.call("session.new", capabilities={})
        self.socket.call("session.subscribe", events=["log.entryAdded"])
        tree = self.socket.call("browsingContext.getTree")
        self.context = tree["contexts"][0]["context"]

    def navigate(self, url):
        self.socket.call("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def size(self, width, height, mobile):
        self.socket.call("browsingContext.setViewport", context=self.context,
                         viewport={"width": width, "height": height})

    def evaluate(self, expression):
        # Values come back as JSON text: BiDi's own encoding of arrays and
        # objects is not worth decoding here.
        result = self.socket.call("script.evaluate", expression=f"JSON.stringify(({expression}))",
                                  target={"context": self.context}, awaitPromise=False)
        if result.get("type") != "success":
            fail(f"script.evaluate: {result}")
        value = result["result"].get("value")
        return None if value is None else json.loads(value)

    def png(self):
        return self.socket.call("browsingContext.captureScreenshot", context=self.context)["data"]

    def errors(self):
        found = [event["params"].get("text") for event in self.socket.events
                 if event.get("method") == "log.entryAdded" and event["params"].get("level") == "error"]
        return found + self.page_errors()


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
    state = page.evaluate("[document.getElementById('link').textContent, document.body.dataset.events, "
                          "document.querySelectorAll('#events li').length]")
    fail(f"the page never showed {what} (link, events, event lines: {state})")


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def open_page(kind, binary, profile):
    """Starts the browser headless; answers (process, page)."""
    port = free_port()
    if kind == "chromium":
        command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "--window-size=1280,720",
                   "about:blank"]
    else:
        command = [binary, "--headless", "--no-remote", "--profile", profile,
                   "--remote-debugging-port", str(port), "--window-size=1280,720", "about:blank"]
    browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if kind == "chromium":
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
                    targets = [t for t in json.load(answer) if t.get("type") == "page"]
                if targets:
                    return browser, Chromium(targets[0]["webSocketDebuggerUrl"])
            else:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return browser, Firefox(f"ws://127.0.0.1:{port}/session")
        except OSError:
            pass
        time.sleep(0.3)
    browser.kill()
    fail(f"{kind} never opened its remote protocol")


def main():
    kind, binary, base, out = sys.argv[1], sys.argv[2], sys.argv[3].rstrip("/"), sys.argv[4]
    out = os.path.join(out, kind)
    os.makedirs(out, exist_ok=True)
    profile = tempfile.mkdtemp(prefix=f"dashboard-check-{kind}-")
    browser, page = open_page(kind, binary, profile)
    try:
        page.size(1280, 720, False)
        page.navigate(base + "/")

        # Before: the first models loaded, the page shows them (from an
        # empty card, so each browser sees the same scenario).
        for model in ("qwen-14b", "llama-8b", "kokoro", "whisper"):
            api(base, f"/api/models/{model}/unpin", "POST")
            api(base, f"/api/models/{model}/unload", "POST")
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

        # The server restarts: the page notices and reconnects by itself.
        restart = os.environ.get("DASHBOARD_RESTART")
        if restart:
            if subprocess.run([restart]).returncode != 0:
                fail("serve did not start again")
            wait_for(page, "document.getElementById('link').className === 'live' && "
                     "document.querySelectorAll('#models tr[data-state=resident]').length === 0",
                     "the restarted (empty) server", seconds=20)
            # Events are live only, so wait until their stream is back too.
            wait_for(page, "document.body.dataset.events === 'live'", "the event stream back",
                     seconds=20)
            api(base, "/api/models/whisper/load", "POST")
            wait_for(page, "[...document.querySelectorAll('#events li')].some(li => "
                     "li.dataset.event === 'loaded' && li.textContent.includes('whisper') && "
                     "li === document.querySelector('#events li'))",
                     "events after the restart", seconds=20)
            print("ok: the page reconnected after the server restarted")

        # A phone-width screen.
        page.size(390, 844, True)
        page.pump(1.5)
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 420:
            fail(f"at phone width the page is {width}px wide")
        page.screenshot(os.path.join(out, "phone.png"))

        errors = page.errors()
        if errors:
            fail(f"JavaScript errors in {kind}: {errors}")
        print(f"ok: no JavaScript error in {kind}")
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()


if __name__ == "__main__":
    main()
