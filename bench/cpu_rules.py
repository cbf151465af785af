"""Rule-checker throughput on CPU: pairs/s over 100k synthesized pairs.

Captions are built from templates in the style of LLaVA-1.5's DIV2K captions
(60-110 words); targets mix what Llama returns: clean single-concept edits
(with plurals, possessives and a/an agreement), colour changes, several
concepts, preambles, notes, quotes, truncations and rewrites. Prints numbers,
asserts nothing (STYLE.md: a benchmark prints, a test asserts).

    python bench/cpu_rules.py [--n 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from collections import Counter

from dataprep.rules import RULES, check

OBJECTS = [("dog", "fox"), ("cat", "owl"), ("bicycle", "scooter"), ("apple", "pear"), ("umbrella", "lantern"),
           ("chair", "stool"), ("boat", "kayak"), ("horse", "camel"), ("vase", "teapot"), ("bench", "swing")]
PLACES = ["a grassy field", "a quiet street", "a rocky beach", "a wooden table", "a snowy park", "a busy market"]
COLOURS = ["brown", "white", "red", "blue", "green", "gray"]
TEMPLATE = (
    "The image features {art} {col} {obj} in {place}. The {obj} is positioned near the center of the frame, "
    "and the background is slightly blurred, creating a focus on the {obj}'s shape. Several {obj_pl} can be seen "
    "further away, adding depth to the scene. The lighting is soft and natural, and the {col2} tones of the "
    "surroundings give the picture a calm and pleasant atmosphere."
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def caption(obj: str, col: str, place: str, col2: str) -> str:
    return TEMPLATE.format(art=article(col), col=col, obj=obj, obj_pl=plural(obj), place=place, col2=col2)


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        (a, b), place = rng.choice(OBJECTS), rng.choice(PLACES)
        col, col2 = rng.sample(COLOURS, 2)
        src = caption(a, col, place, col2)
        good = caption(b, col, place, col2)
        kind = rng.random()
        if kind < 0.5:
            tgt = good
        elif kind < 0.6:
            tgt = caption(a, rng.choice([c for c in COLOURS if c != col]), place, col2)
        elif kind < 0.7:
            tgt = caption(b, col, rng.choice([p for p in PLACES if p != place]), col2)
        elif kind < 0.75:
            tgt = "Here is the modified text:\n\n" + good
        elif kind < 0.8:
            tgt = good + f"\n\nNote: I replaced the {a} with {article(b)} {b}."
        elif kind < 0.85:
            tgt = '"' + good + '"'
        elif kind < 0.9:
            tgt = good[: rng.randrange(len(good) // 2, len(good) - 10)].rstrip(" .")
        elif kind < 0.95:
            tgt = good.replace("The lighting is soft and natural, and", "Soft, natural light falls on the scene, while")
        else:
            tgt = src
        pairs.append((src, tgt))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="pairs to check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pairs = make_pairs(args.n, args.seed)
    words = sum(len(s.split()) + len(t.split()) for s, t in pairs) / (2 * len(pairs))
    check(*pairs[0])  # warm the regex caches
    t0 = time.perf_counter()
    verdicts = [check(s, t) for s, t in pairs]
    dt = time.perf_counter() - t0
    by_rule = Counter(v for verdict in verdicts for v in verdict.violations)
    passed = sum(v.passed for v in verdicts)
    print(f"python {platform.python_version()} on {platform.machine()}, 1 process")
    print(f"pairs: {len(pairs)}  mean words per text: {words:.0f}")
    print(f"time: {dt:.2f} s  throughput: {len(pairs) / dt:,.0f} pairs/s  ({1e6 * dt / len(pairs):.0f} us/pair)")
    print(f"passed: {passed} ({passed / len(pairs):.1%})")
    for rule in RULES:
        print(f"  {rule:20s} {by_rule.get(rule, 0):7d}")


if __name__ == "__main__":
    main()
