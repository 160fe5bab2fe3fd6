#!/usr/bin/env python3
"""Write a random load/unload trace as a `vram-manager scenario` file.

    python3 benches/seed/gen_trace.py N [--seed S] > trace.toml

The trace has a fixed catalog of 12 models on a 16 GiB card and N steps,
about 80% loads and 20% unloads of models drawn uniformly at random from a
`random.Random(S)`, so the same N and S always give the same file.  Steps
carry no expectations (`expect`, `evicted`, `resident`, `free`), so a step
passes when its result is "ok".

The same file is read by `drive_seed.py`, which replays it against the
Python class vram-manager was ported from.
"""

import argparse
import random
import sys

CARD_GIB = 16

# (id, kind, GiB). Whole GiB only, so the Python class's float arithmetic is
# exact and both sides see the same sizes.
#
# Both vram-manager and the Python class protect ASR models from eviction for
# a TTS or LLM request, and that is the only way a load of a model that fits
# the card can fail.  The ASR models together (1 + 3 GiB) plus the largest
# other model (12 GiB) fill the card exactly, so no load in any order can
# fail: `vram-manager scenario` exits 0 on every trace, and the timings do
# not depend on how often an error path is taken.  `check_catalog` enforces
# this if the catalog is changed.
MODELS = [
    ("asr-0", "asr", 1),
    ("asr-1", "asr", 3),
    ("tts-0", "tts", 1),
    ("tts-1", "tts", 2),
    ("tts-2", "tts", 2),
    ("llm-0", "llm", 4),
    ("llm-1", "llm", 5),
    ("llm-2", "llm", 6),
    ("llm-3", "llm", 7),
    ("llm-4", "llm", 8),
    ("llm-5", "llm", 10),
    ("llm-6", "llm", 12),
]

LOAD_SHARE = 0.8


def check_catalog(models, card_gib):
    """Fail early if some order of steps could make a load fail.

    Every model must fit the card alone, and all ASR models together plus the
    largest non-ASR model must fit, because ASR models are never evicted for a
    non-ASR load.
    """
    for model_id, _kind, gib in models:
        if gib > card_gib:
            raise ValueError(f"{model_id} ({gib} GiB) is larger than the card ({card_gib} GiB)")
    asr = sum(gib for _, kind, gib in models if kind == "asr")
    largest_other = max((gib for _, kind, gib in models if kind != "asr"), default=0)
    if asr + largest_other > card_gib:
        raise ValueError(
            f"ASR models ({asr} GiB) plus the largest other model "
            f"({largest_other} GiB) exceed the card ({card_gib} GiB): loads could fail"
        )


def write_trace(steps, seed, out):
    """Write the scenario for `steps` steps drawn with `seed` to the text stream `out`.

    Lines are written as they are drawn (no list of steps is built), so a
    300,000-step trace costs little memory and about a second.
    """
    check_catalog(MODELS, CARD_GIB)
    rng = random.Random(seed)
    ids = [model_id for model_id, _, _ in MODELS]
    write = out.write
    write(
        f'description = "Random trace: {steps} steps, about {LOAD_SHARE:.0%} loads, '
        f'seed {seed}, {len(MODELS)} models on a {CARD_GIB} GiB card"\n\n'
    )
    write(f'[gpu]\ntotal = "{CARD_GIB}GiB"\n\n')
    for model_id, kind, gib in MODELS:
        write(f'[[models]]\nid = "{model_id}"\nkind = "{kind}"\nvram = "{gib}GiB"\n\n')
    for _ in range(steps):
        # Draw the op before the model, always both, so a trace of N steps
        # is a prefix of the trace of N + 1 steps with the same seed.
        op = "load" if rng.random() < LOAD_SHARE else "unload"
        model_id = rng.choice(ids)
        write(f'[[steps]]\nop = "{op}"\nmodel = "{model_id}"\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=int, help="number of steps (at least 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("N must be at least 1")
    write_trace(args.steps, args.seed, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
