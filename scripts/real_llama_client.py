#!/usr/bin/env python3
"""Drives `vram-manager serve` with the official `openai` client against two
real llama.cpp servers (see scripts/real-llama-check.sh). Exits non-zero on
the first thing that is wrong.

    python3 scripts/real_llama_client.py BASE_URL MODEL_A MODEL_B
"""

import json
import sys
import urllib.request

from openai import OpenAI


def check(ok, what):
    if not ok:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def status(base):
    with urllib.request.urlopen(f"{base}/api/status", timeout=30) as answer:
        return json.load(answer)


def state(report, model):
    return next((m["state"] for m in report["models"] if m["id"] == model), None)


def main():
    base, model_a, model_b = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=f"{base}/v1", api_key="not-used", timeout=120)
    ask = [{"role": "user", "content": "Say something."}]
    # Greedy, so the streamed answer must equal the whole one.
    same = {"max_tokens": 12, "temperature": 0.0, "seed": 7}

    listed = sorted(m.id for m in client.models.list().data)
    check(listed == sorted([model_a, model_b]), f"models.list() names both models: {listed}")

    whole = client.chat.completions.create(model=model_a, messages=ask, **same)
    text = whole.choices[0].message.content
    check(whole.choices[0].finish_reason in ("stop", "length"), f"a chat completion from {model_a}: {text!r}")
    check(state(status(base), model_a) == "resident", f"{model_a} is resident after its request")

    # The stream through the openai client: every chunk, in order.
    pieces = []
    finish = None
    for chunk in client.chat.completions.create(model=model_a, messages=ask, stream=True, **same):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    streamed = "".join(pieces)
    check(len(pieces) >= 2, f"the stream came in {len(pieces)} chunks")
    check(finish in ("stop", "length"), f"the stream ended with finish_reason {finish!r}")
    check(streamed == text, f"the streamed text equals the whole answer: {streamed!r}")

    # The same stream raw: server-sent events, `[DONE]` last.
    body = json.dumps({"model": model_a, "messages": ask, "stream": True, **same}).encode()
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    events = []
    with urllib.request.urlopen(request, timeout=120) as answer:
        check(answer.status == 200, f"raw stream status {answer.status}")
        kind = answer.headers.get("content-type", "")
        check(kind.startswith("text/event-stream"), f"raw stream content-type {kind}")
        for line in answer:
            line = line.decode().strip()
            if line.startswith("data:"):
                events.append(line[5:].strip())
    check(events and events[-1] == "[DONE]", f"[DONE] is the last of {len(events)} events")
    check("[DONE]" not in events[:-1], "[DONE] comes once")

    # The other model needs the first one's room: it is evicted.
    other = client.chat.completions.create(model=model_b, messages=ask, **same)
    check(other.choices[0].message is not None, f"a chat completion from {model_b}")
    report = status(base)
    check(state(report, model_b) == "resident", f"{model_b} is resident")
    check(state(report, model_a) != "resident", f"{model_a} was evicted for {model_b} (now {state(report, model_a)})")

    # And back: the first one evicts the second.
    again = client.chat.completions.create(model=model_a, messages=ask, **same)
    check(again.choices[0].message.content == text, f"{model_a} answers the same after its reload")
    check(state(status(base), model_b) != "resident", f"{model_b} was evicted for {model_a}")
    print("all checks passed")


if __name__ == "__main__":
    main()
