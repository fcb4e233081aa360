"""Kudos prices: the AI Horde's legacy image formula (shared/horde-facts.md)."""

from __future__ import annotations

import math

from models.catalog import Family

_FAMILY_MULTIPLIER = {
    Family.stable_diffusion_1: 1.0,
    Family.stable_diffusion_xl: 2.0,
    Family.stable_cascade: 4.0,
}
REQUEST_TAX = 1.0


def image_cost(
    *,
    width: int,
    height: int,
    steps: int,
    n: int,
    family: Family,
    post_processors: int = 0,
    controlnet: bool = False,
    loras: int = 0,
    tis: bool = False,
    source_image: bool = False,
) -> float:
    """Kudos for a whole request of `n` images."""
    r = ((width * height - 64**2) ** 1.75) / ((1024**2 - 64**2) ** 1.75)
    per_image = 0.1232 * steps + r * 0.1232 * steps * 8.75
    per_image *= _FAMILY_MULTIPLIER[family]
    per_image *= 1.2**post_processors
    if controlnet:
        per_image *= 3
    per_image += 3 * loras + (1 if tis else 0)
    if source_image:
        per_image *= 1.3
    return round(per_image * n + REQUEST_TAX, 2)


# Jobs at least this large need their kudos upfront (shared/horde-facts.md), so anonymous
# users (who never hold any) cannot queue expensive work.
UPFRONT_PIXELS = 1024 * 1024
UPFRONT_STEPS = 50


def needs_upfront_kudos(width: int, height: int, steps: int) -> bool:
    return width * height > UPFRONT_PIXELS or steps > UPFRONT_STEPS


def head_start_seconds(kudos: float, anonymous: bool, seconds_per_decade: float,
                       anonymous_penalty: float) -> float:
    """A request's place in the queue, as seconds of waiting it is credited with at submit
    (the queue orders by submit time minus this; waiting raises everyone alike, so nothing
    starves). Kudos count on a log scale: each tenfold of the balance is worth
    `seconds_per_decade`, a negative balance costs the same way, and the anonymous user (whose
    shared balance means nothing) always starts `anonymous_penalty` seconds behind."""
    if anonymous:
        return -anonymous_penalty
    magnitude = seconds_per_decade * math.log10(1 + abs(kudos))
    return max(magnitude if kudos >= 0 else -magnitude, -anonymous_penalty)


# Text requests at least this large need their kudos upfront, as on the AI Horde (its
# `require_upfront_kudos`: over 512 tokens, or `slow_workers: false`), and beyond it over a
# context of 8,192 tokens: the anonymous user (whose balance anyone may spend) cannot queue
# costly text, and a worker cannot be paid large sums out of it.
TEXT_UPFRONT_TOKENS = 512
TEXT_UPFRONT_CONTEXT = 8192
# The context's weight in a text price stops growing here (the AI Horde caps its context
# multiplier at 30 too, "to prevent shenanigans").
TEXT_CONTEXT_FACTOR_CAP = 30.0


def needs_upfront_text_kudos(max_length: int, max_context_length: int, slow_workers: bool) -> bool:
    return (max_length > TEXT_UPFRONT_TOKENS or max_context_length > TEXT_UPFRONT_CONTEXT
            or not slow_workers)


def text_cost(*, max_length: int, max_context_length: int, n: int) -> float:
    """Kudos for a text request of `n` generations, at most: a generation is paid for the
    tokens delivered (api/db/queue.py earned). shared/horde-facts.md gives no text formula,
    so this one is ours: a kudos per 100 tokens asked for, scaled up by the context the model
    attends over (twice as much at 4096 tokens of context, at most x30), plus the request
    tax."""
    factor = min(1 + max_context_length / 4096, TEXT_CONTEXT_FACTOR_CAP)
    return round(max_length / 100 * factor * n + REQUEST_TAX, 2)
