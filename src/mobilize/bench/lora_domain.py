"""A domain for a real LoRA adapter: the coastal bulletins of an archipelago that exists only here (the Skerrow
Isles), written for mobilize by a small grammar. The style is one no model has read (invented sea areas, months
and terms), so an adapter trained on it must visibly lower perplexity on bulletins it was not trained on.

`bulletins(seed, n)` is deterministic; the training text is seed 0, the evaluation text seed 1 (no bulletin of
one appears in the other: each names its number, hour and day).
"""

from __future__ import annotations

import random

AREAS = [
    "Varrowmere", "Outer Skellis", "Inner Skellis", "Kelder Deep", "Hollin Bank", "The Gannet Roads", "Mirrow",
    "Saltholme", "Tarn Sound", "Brackwater", "Ousel Head", "The Drowned Stair", "Cullen Flats", "Farrowdown",
]  # fmt: skip
MONTHS = ["Thawmonth", "Seedmonth", "Hayfall", "Brightwane", "Reekmonth", "Frostwane"]
DAYS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
        "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth"]  # fmt: skip
DIRECTIONS = ["north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest", "variable"]
TURNS = ["veering", "backing", "becoming"]
SEAS = ["smooth", "slight", "moderate", "rough", "very rough", "high", "churned"]
WEATHER = ["fair", "rain", "showers", "squally showers", "drizzle", "fog patches", "sleet", "a brine haze", "thunder"]
VISIBILITY = ["good", "moderate", "poor", "very poor", "good, occasionally poor", "moderate or poor"]
SIGNS = [
    "Gulls flying low over the Kelder tide.", "The bell at Ousel Head rang twice unbidden.",
    "Weed thick on the Hollin shoals.", "Lantern boats are asked to show two lights.",
    "The Drowned Stair is awash at half ebb.", "Seals hauled out early at Saltholme.",
]  # fmt: skip
CLOSINGS = [
    "Keep a sharp lookout and mind the Kelder tide.", "Fishers of the outer roads should make harbour by dusk.",
    "Ferries between Mirrow and Saltholme run as charted.", "The Coastwatch hears on the eleventh band.",
]  # fmt: skip


def _wind(rng: random.Random) -> str:
    d = rng.choice(DIRECTIONS)
    low = rng.randint(2, 7)
    text = f"{d} {low}" if rng.random() < 0.4 else f"{d} {low} to {low + rng.randint(1, 2)}"
    if rng.random() < 0.5 and d != "variable":
        text += f", {rng.choice(TURNS)} {rng.choice(DIRECTIONS[:-1])} {low + rng.randint(0, 2)} later"
    if low >= 6 and rng.random() < 0.5:
        text += f", occasionally gale {low + 2}"
    return text


def _sea(rng: random.Random) -> str:
    a = rng.randrange(len(SEAS) - 1)
    return SEAS[a] if rng.random() < 0.5 else f"{SEAS[a]} becoming {SEAS[a + 1]}"


def bulletin(rng: random.Random, number: int) -> str:
    hour = rng.choice(["0000", "0600", "1200", "1800"])
    day, month = rng.choice(DAYS), rng.choice(MONTHS)
    lines = [f"Bulletin {number} of the Skerrow Isles Coastwatch, issued at {hour} on the {day} of {month}."]
    areas = rng.sample(AREAS, rng.randint(3, 5))
    while areas:
        group = [areas.pop() for _ in range(min(len(areas), rng.randint(1, 2)))]
        weather = rng.choice(WEATHER)
        if rng.random() < 0.4:
            weather += f", {rng.choice(WEATHER)} later"
        lines.append(f"{', '.join(group)}. Wind {_wind(rng)}. Sea {_sea(rng)}. {weather.capitalize()}. "
                     f"Visibility {rng.choice(VISIBILITY)}.")  # fmt: skip
    if rng.random() < 0.6:
        lines.append(f"Signs: {rng.choice(SIGNS)}")
    lines.append(f"Next bulletin at {(int(hour) + 600) % 2400:04d}. {rng.choice(CLOSINGS)}")
    return "\n".join(lines)


def bulletins(seed: int, n: int) -> str:
    """n bulletins, numbered from 100 + 1000 * seed (so two seeds' texts never share a bulletin's first line)."""
    rng = random.Random(seed)
    return "\n\n".join(bulletin(rng, 100 + 1000 * seed + i) for i in range(n)) + "\n"


TRAIN_SEED, EVAL_SEED = 0, 1
