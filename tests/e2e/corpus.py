"""A small labeled corpus written for the tests: three topics, short varied sentences."""

from __future__ import annotations

import itertools
import random

LABELS = {
    "sport": "A sentence about sport: matches, teams, players, goals, races and tournaments.",
    "weather": "A sentence about the weather: rain, snow, sunshine, storms, wind and temperatures.",
    "cooking": "A sentence about cooking: recipes, ingredients, baking, frying and kitchens.",
}

_PARTS = {
    "sport": (
        ["The striker", "Our goalkeeper", "The home team", "The cyclist", "The tennis champion", "The coach"],
        [
            "scored twice in the final",
            "won the league title",
            "broke the sprint record",
            "lost the semi-final",
            "trained hard before the derby",
            "celebrated a late winning goal",
        ],
        [
            "on Saturday.",
            "in front of a full stadium.",
            "after extra time.",
            "this season.",
            "at the tournament.",
        ],
    ),
    "weather": (
        ["Heavy rain", "A cold front", "Thick fog", "A summer heatwave", "Strong winds", "Fresh snow"],
        [
            "is expected across the north",
            "brought flooding to the valley",
            "closed the mountain roads",
            "pushed temperatures above thirty degrees",
            "will clear by the afternoon",
            "left icy pavements",
        ],
        [
            "tomorrow morning.",
            "according to the forecast.",
            "overnight.",
            "this weekend.",
            "for most of the week.",
        ],
    ),
    "cooking": (
        [
            "Whisk the eggs",
            "Simmer the tomato sauce",
            "Knead the bread dough",
            "Fry the onions",
            "Season the soup",
            "Roast the vegetables",
        ],
        [
            "with butter and a pinch of salt",
            "until it thickens",
            "for ten minutes",
            "in olive oil",
            "with fresh basil and garlic",
            "in a hot oven",
        ],
        ["before serving.", "for a quick dinner.", "as the recipe says.", "in a large pan.", "until golden."],
    ),
}


def make_corpus(per_label: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for label, (subjects, verbs, tails) in _PARTS.items():
        combos = list(itertools.product(subjects, verbs, tails))
        rng.shuffle(combos)
        for i, (s, v, t) in enumerate(combos[:per_label]):
            rows.append({"id": f"{label}-{i:03d}", "text": f"{s} {v} {t}", "label": label})
    rng.shuffle(rows)
    return rows
