#!/usr/bin/env python3
"""Replay a scenario trace against the Python class vram-manager was ported from.

    python3 benches/seed/drive_seed.py SEED_CLASS_PATH trace.toml

SEED_CLASS_PATH is the file that defines `VRAMManager(total_vram_gb)`; it is
imported from that path.  The trace is a scenario file as written by
`gen_trace.py` (only `load` and `unload` steps; expectations are ignored).

Each model gets a backend whose `load` and `unload` do nothing, so what is
measured is the class's own bookkeeping, as with the simulated backends of
`vram-manager scenario`.  Steps run in order in one asyncio loop:

- load: `await manager.load_model(id, kind, gib, backend)`; an exception
  (not enough VRAM could be freed) makes the step "error" and the replay
  goes on;
- unload: what the class does to an eviction victim, under its lock:
  `await slot.backend.unload(id)` and `del manager._loaded[id]`, if the model
  is loaded (the class has no public unload).

One JSON line per step, then a summary line, go to stdout:

    {"step":1,"op":"load","model":"x","result":"ok","resident":["x"],"used_gib":3.0}
    {"summary":{"steps":N,"failed":F}}

The exit status is 0 when the trace was replayed (failed loads included),
2 when the class or the trace cannot be read.
"""

import asyncio
import importlib.util
import json
import re
import sys
import tomllib

_UNITS = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*$")


def size_gib(text):
    """Convert a size string of the scenario format ("6GiB", "512MiB") to GiB.

    The class counts VRAM in GiB floats; whole GiB and MiB values convert
    exactly.
    """
    match = _SIZE.match(text)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a size like \"6GiB\" or \"512MiB\"")
    return float(match.group(1)) * _UNITS[match.group(2)] / 1024**3


def import_seed_class(path):
    """Import `VRAMManager` from the file at `path`, whatever its directory."""
    spec = importlib.util.spec_from_file_location("seed_vram_manager", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import a module from {path}")
    module = importlib.util.module_from_spec(spec)
    # The class uses @dataclass, which looks its module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.VRAMManager


class NoopBackend:
    """A backend that loads and unloads instantly, like a simulated one."""

    async def load(self, model_id):
        pass

    async def unload(self, model_id):
        pass


def read_trace(path):
    """Read the trace: the card's size in GiB, the models, the steps."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    total_gib = size_gib(doc.get("gpu", {}).get("total", "16GiB"))
    models = {}
    for model in doc.get("models", []):
        models[model["id"]] = (model["kind"], size_gib(model["vram"]))
    steps = []
    for number, step in enumerate(doc.get("steps", []), start=1):
        op, model_id = step.get("op"), step.get("model")
        if op not in ("load", "unload"):
            raise ValueError(f"step {number}: op {op!r} is not replayed (only load and unload)")
        if model_id not in models:
            raise ValueError(f"step {number}: unknown model {model_id!r}")
        steps.append((op, model_id))
    return total_gib, models, steps


async def replay(manager_class, total_gib, models, steps, out):
    """Run `steps` in order on a fresh manager, writing one JSON line per step.

    Returns the number of failed steps.
    """
    manager = manager_class(total_gib)
    # One backend per model, as an application would wire them.
    backends = {model_id: NoopBackend() for model_id in models}
    dumps = json.dumps
    failed = 0
    for number, (op, model_id) in enumerate(steps, start=1):
        result = "ok"
        if op == "load":
            kind, gib = models[model_id]
            try:
                await manager.load_model(model_id, kind, gib, backends[model_id])
            except Exception:  # The class raises RuntimeError when it cannot free enough.
                result = "error"
                failed += 1
        else:
            # The class has no unload; do what `_evict_for` does to a victim,
            # under the same lock a load takes.
            async with manager._lock:
                slot = manager._loaded.get(model_id)
                if slot is not None:
                    await slot.backend.unload(model_id)
                    del manager._loaded[model_id]
        loaded = manager._loaded
        line = {
            "step": number,
            "op": op,
            "model": model_id,
            "result": result,
            "resident": sorted(loaded),
            "used_gib": sum((slot.vram_gb for slot in loaded.values()), 0.0),
        }
        # Written to the buffered stdout, not flushed per line, so output
        # costs what a normal program's logging would.
        out.write(dumps(line, separators=(",", ":")))
        out.write("\n")
    out.write(dumps({"summary": {"steps": len(steps), "failed": failed}}, separators=(",", ":")))
    out.write("\n")
    return failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: drive_seed.py SEED_CLASS_PATH TRACE.toml", file=sys.stderr)
        return 2
    class_path, trace_path = argv
    try:
        manager_class = import_seed_class(class_path)
        total_gib, models, steps = read_trace(trace_path)
    except (OSError, ImportError, AttributeError, KeyError, ValueError, tomllib.TOMLDecodeError) as err:
        print(f"drive_seed.py: {err}", file=sys.stderr)
        return 2
    asyncio.run(replay(manager_class, total_gib, models, steps, sys.stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
