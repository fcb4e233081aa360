"""Prompt filters: their rows, each replica's compiled cache of them, and the screening of
prompts (what each filter type does: see the package docstring). The routes stay thin; the
rules live here.

Matching runs on the `regex` engine (a dependency of transformers, so always installed) in its
`re`-compatible mode, because it can stop a search after a timeout: a regex that backtracks
catastrophically cannot hold a request, or a replica, for long. A new regex must compile with
both `re` and `regex`, must not match the empty text (it would match every prompt), and must
match a few long probe texts quickly. Every search of one prompt shares MATCH_BUDGET_SECONDS;
a prompt that cannot be screened within it is refused (fail closed) and not held against the
user. Prompts are capped too: 50,000 characters at submit (api/schemas.py), 10,000 here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import regex
from sqlalchemy import func, or_, select, update
from starlette.concurrency import run_in_threadpool

from api.db.models import PromptFilter, PromptFilterVersion, User
from api.db.session import Database
from api.errors import HordeError
from api.filters.protocol import FilterDetails, FilterPatch, FilterRegex, FilterSuspicion, NewFilter

if TYPE_CHECKING:
    from api.images import Context

log = logging.getLogger("rayhorde.api")

MINORS, SEXUAL, BLOCKED = 10, 11, 20  # the filter types that act (package docstring)
MAX_FILTERS = 1000
MAX_MATCHES = 100  # matched texts one check lists at most
FLAGS = regex.IGNORECASE | regex.VERSION0
MATCH_BUDGET_SECONDS = 1.0  # all searches of one prompt together
PROBE_SECONDS = 0.05  # each probe of a new regex
PROBES = ("a" * 3000 + "!", "ab " * 1000 + "!", "1" * 3000 + "!", "a1 _-." * 500 + "\n!")
TOS_MESSAGE = ("This prompt appears to violate our terms of service and will be reported. "
               "Please contact us if you think this is an error.")
BLOCKED_MESSAGE = "prompt: matches a blocked term"
SLOW_MESSAGE = "prompt: could not be checked against the prompt filters in time; shorten it"
REPLACED_WARNING = {"code": "PromptReplaced",
                    "message": "prompt: terms matched by the replacement filter were replaced"}


# ---------------------------------------------------------------------------- regexes


def compile_filter(text: str) -> regex.Pattern:
    """A filter's regex as it is matched. Raises re.error or regex.error."""
    re.compile(text, re.IGNORECASE)
    return regex.compile(text, FLAGS)


def validate_regex(text: str) -> None:
    """Refuse (400 InvalidRegex, naming `regex`) what does not compile, what matches the empty
    text and what is slow on the probes. Call it outside any transaction: probing takes up to
    len(PROBES) * PROBE_SECONDS."""
    try:
        pattern = compile_filter(text)
    except (re.error, regex.error) as e:
        raise HordeError(400, "InvalidRegex", f"regex: does not compile: {e}") from None
    if pattern.search("") is not None:
        raise HordeError(400, "InvalidRegex",
                         "regex: matches the empty text, so it would match every prompt")
    for probe in PROBES:
        try:
            pattern.search(probe, timeout=PROBE_SECONDS)
        except TimeoutError:
            raise HordeError(400, "InvalidRegex", "regex: too slow to match (catastrophic "
                             "backtracking); simplify it") from None


@dataclass(frozen=True)
class CompiledFilter:
    id: str
    filter_type: int
    pattern: regex.Pattern
    replacement: str | None


@dataclass(frozen=True)
class FilterSet:
    """One replica's filters at one `version`, compiled, by type (oldest first)."""

    version: int
    by_type: dict[int, tuple[CompiledFilter, ...]] = field(default_factory=dict)

    def of(self, filter_type: int | None) -> tuple[CompiledFilter, ...]:
        """One type's filters, or with None every filter."""
        if filter_type is not None:
            return self.by_type.get(filter_type, ())
        return tuple(f for t in sorted(self.by_type) for f in self.by_type[t])


class _Clock:
    """The time budget shared by all searches of one prompt."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def _left(self, f: CompiledFilter) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            self._late(f)
        return left

    def _late(self, f: CompiledFilter):
        log.error("prompt filter %s: matching ran out of time; check its regex", f.id)
        raise HordeError(400, "CorruptPrompt", SLOW_MESSAGE)

    def search(self, f: CompiledFilter, text: str) -> bool:
        try:
            return f.pattern.search(text, timeout=self._left(f)) is not None
        except TimeoutError:
            self._late(f)

    def findall(self, f: CompiledFilter, text: str) -> list[str]:
        try:
            return [m.group(0) for m in f.pattern.finditer(text, timeout=self._left(f))]
        except TimeoutError:
            self._late(f)

    def replace(self, f: CompiledFilter, text: str) -> str:
        try:  # a function, so the replacement is taken literally (no group references)
            return f.pattern.sub(lambda _m: f.replacement, text, timeout=self._left(f))
        except TimeoutError:
            self._late(f)


# ---------------------------------------------------------------------------- the cache


class FilterCache:
    """One API replica's compiled filters. `start()` (in the app's lifespan) loads them and
    starts `follow()`, which re-reads the version row every `refresh_seconds` on an engine of
    its own, so polling never takes a connection from requests nor counts among their
    statements; the filters are reloaded only when the version moved, and each distinct regex
    is compiled once. Without a running `follow()` (an app used without its lifespan, or
    api.images called directly), `current()` does the same check inline when the last one is
    that old."""

    def __init__(self, db: Database, refresh_seconds: float):
        self.db, self.refresh_seconds = db, refresh_seconds
        self._set: FilterSet | None = None
        self._checked = 0.0  # time.monotonic() of the last version read
        self._compiled: dict[str, regex.Pattern] = {}
        self._lock = threading.Lock()
        self._followers = 0

    async def start(self) -> asyncio.Task:
        """Load the filters before the app serves, so no request races the first load (if it
        fails, `current()` loads inline later), then follow the database."""
        try:
            await run_in_threadpool(self.refresh)
        except Exception:
            log.exception("loading the prompt filters failed; the first request retries")
        return asyncio.create_task(self.follow())

    def current(self) -> FilterSet:
        """The filters to screen with; no statement unless none were ever loaded (or nothing
        is following the database)."""
        if self._set is None or (not self._followers
                                 and time.monotonic() - self._checked >= self.refresh_seconds):
            self.refresh()
        return self._set

    def refresh(self, db: Database | None = None) -> bool:
        """Read the version (one statement) and reload the filters if it moved (one more).
        True when they were reloaded."""
        with self._lock, (db or self.db).read() as session:
            version = session.scalar(select(PromptFilterVersion.version)
                                     .where(PromptFilterVersion.id == 1)) or 0
            self._checked = time.monotonic()
            if self._set is not None and self._set.version == version:
                return False
            # Read after the version: under READ COMMITTED these rows may be newer than it,
            # which only costs one more reload, never a missed change.
            rows = session.execute(
                select(PromptFilter.id, PromptFilter.filter_type, PromptFilter.regex,
                       PromptFilter.replacement)
                .order_by(PromptFilter.created_at, PromptFilter.id)).all()
            self._set = self._build(version, rows)
            return True

    def _build(self, version: int, rows) -> FilterSet:
        compiled: dict[str, regex.Pattern] = {}
        by_type: dict[int, list[CompiledFilter]] = {}
        for filter_id, filter_type, text, replacement in rows:
            pattern = compiled.get(text) or self._compiled.get(text)
            if pattern is None:
                try:
                    pattern = compile_filter(text)
                except (re.error, regex.error):
                    log.error("prompt filter %s no longer compiles; skipped", filter_id)
                    continue
            compiled[text] = pattern
            by_type.setdefault(filter_type, []).append(
                CompiledFilter(filter_id, filter_type, pattern, replacement or None))
        self._compiled = compiled
        return FilterSet(version, {t: tuple(fs) for t, fs in by_type.items()})

    async def follow(self) -> None:
        """Poll for changes every `refresh_seconds` until cancelled."""
        own = self.db if ":memory:" in self.db.url else Database(self.db.url)
        self._followers += 1
        try:
            while True:
                await asyncio.sleep(self.refresh_seconds)
                try:
                    # Not abandoned when cancelled: the engine is disposed after it ends.
                    await run_in_threadpool(self.refresh, own)
                except Exception:
                    log.exception("reading the prompt filters failed; retrying")
        finally:
            self._followers -= 1
            if own is not self.db:
                own.dispose()


def cache_of(ctx: Context) -> FilterCache:
    """The replica's cache (made on first use; create_app makes it at start)."""
    if getattr(ctx, "filters", None) is None:
        ctx.filters = FilterCache(ctx.db, ctx.settings.filter_refresh_seconds)
    return ctx.filters


# ---------------------------------------------------------------------------- screening


def _suspect(filters: FilterSet, text: str, clock: _Clock) -> list[CompiledFilter]:
    """Refuse a blocked text; otherwise the type-10 filters it matches when it also matches a
    type-11 one (the CSAM guard's pair), else []."""
    if any(clock.search(f, text) for f in filters.of(BLOCKED)):
        raise HordeError(400, "CorruptPrompt", BLOCKED_MESSAGE)
    minors = [f for f in filters.of(MINORS) if clock.search(f, text)]
    if minors and any(clock.search(f, text) for f in filters.of(SEXUAL)):
        return minors
    return []


def screen(ctx: Context, prompt: str, replace: bool, session=None,
           user: User | None = None) -> tuple[str, list[dict[str, str]]]:
    """Screen the positive part of an image prompt: returns the prompt to use (replaced when
    the replacement filter applied) and warnings, or raises 400 CorruptPrompt.

    When the CSAM guard refuses and `session` and `user` are given, the user's suspicion is
    raised by one and the caller's transaction COMMITTED before the refusal, so the rollback
    that follows does not undo it: call this before anything else is written in `session`.
    No statement otherwise (the filters come from the replica's cache)."""
    filters = cache_of(ctx).current()
    if not filters.by_type:
        return prompt, []
    clock = _Clock(MATCH_BUDGET_SECONDS)
    minors = _suspect(filters, prompt, clock)
    if not minors:
        return prompt, []
    if replace and all(f.replacement for f in minors):
        replaced = prompt
        for f in minors:
            replaced = clock.replace(f, replaced)
        if not _suspect(filters, replaced, clock):
            return replaced, [dict(REPLACED_WARNING)]
    if session is not None and user is not None:
        session.execute(update(User).where(User.id == user.id)
                        .values(suspicion=User.suspicion + 1))
        session.commit()
        log.warning("prompt refused by the CSAM guard; suspicion of user %s raised", user.id)
    raise HordeError(400, "CorruptPrompt", TOS_MESSAGE)


def check_prompt(filters: FilterSet, prompt: str, filter_type: int | None) -> FilterSuspicion:
    """`POST /v2/filters`: how many filters (of `filter_type`, or all) match the whole text,
    and what they matched."""
    clock = _Clock(MATCH_BUDGET_SECONDS)
    suspicion, matches = 0, []
    for f in filters.of(filter_type):
        found = clock.findall(f, prompt)
        if found:
            suspicion += 1
            for text in found:
                if text and text not in matches and len(matches) < MAX_MATCHES:
                    matches.append(text)
    return FilterSuspicion(suspicion=suspicion, matches=matches)


# ---------------------------------------------------------------------------- rows


def _details(f: PromptFilter, username: str) -> FilterDetails:
    return FilterDetails(id=f.id, regex=f.regex, filter_type=f.filter_type,
                         description=f.description or "", replacement=f.replacement or "",
                         user=f"{username}#{f.user_id}")


def _bump(session) -> None:
    """Raise the filters' version in the caller's transaction. Done first in every change:
    the row lock serialises changes (PostgreSQL; SQLite has one writer anyway)."""
    V = PromptFilterVersion
    if not session.execute(update(V).where(V.id == 1).values(version=V.version + 1)).rowcount:
        session.add(V(id=1, version=1))
        session.flush()


def _load(session, filter_id: str) -> PromptFilter:
    f = session.get(PromptFilter, filter_id) if len(filter_id) <= 36 else None
    if f is None:
        raise HordeError(404, "FilterNotFound", f"id: no filter {filter_id}")
    return f


def list_filters(session, filter_type: int | None, contains: str | None) -> list[FilterDetails]:
    """Oldest first; `contains` looks in the regex and the description, ignoring case."""
    q = (select(PromptFilter, User.username).join(User, User.id == PromptFilter.user_id)
         .order_by(PromptFilter.created_at, PromptFilter.id))
    if filter_type is not None:
        q = q.where(PromptFilter.filter_type == filter_type)
    if contains:
        needle = contains.lower()
        q = q.where(or_(func.lower(PromptFilter.regex).contains(needle, autoescape=True),
                        func.lower(PromptFilter.description).contains(needle, autoescape=True)))
    return [_details(f, username) for f, username in session.execute(q).all()]


def get_filter(session, filter_id: str) -> FilterDetails:
    f = _load(session, filter_id)
    return _details(f, session.get(User, f.user_id).username)


def add_filter(session, moderator: User, body: NewFilter) -> FilterDetails:
    """The regex must have passed validate_regex."""
    _bump(session)
    if session.scalar(select(func.count()).select_from(PromptFilter)) >= MAX_FILTERS:
        raise HordeError(400, "TooManyFilters",
                         f"regex: there are {MAX_FILTERS} filters already; delete some first")
    now = time.time()
    f = PromptFilter(regex=body.regex, filter_type=body.filter_type,
                     description=body.description or "", replacement=body.replacement or None,
                     user_id=moderator.id, created_at=now, updated_at=now)
    session.add(f)
    session.flush()
    return _details(f, moderator.username)


def change_filter(session, moderator: User, filter_id: str, body: FilterPatch) -> FilterDetails:
    """What `body` gives changes (a new regex must have passed validate_regex); the moderator
    becomes the filter's `user`."""
    if all(getattr(body, name) is None for name in FilterPatch.model_fields):
        raise HordeError(400, "NoValidActions",
                         "body: give at least one of regex, filter_type, description, replacement")
    f = _load(session, filter_id)
    _bump(session)
    for name in ("regex", "filter_type", "description"):
        if getattr(body, name) is not None:
            setattr(f, name, getattr(body, name))
    if body.replacement is not None:
        f.replacement = body.replacement or None
    f.user_id, f.updated_at = moderator.id, time.time()
    session.flush()
    return _details(f, moderator.username)


def delete_filter(session, filter_id: str) -> None:
    session.delete(_load(session, filter_id))
    _bump(session)
    session.flush()


def combined_regexes(session, filter_type: int | None) -> list[FilterRegex]:
    """One regex per type present: the alternation of its filters' regexes, oldest first."""
    q = select(PromptFilter.filter_type, PromptFilter.regex).order_by(
        PromptFilter.filter_type, PromptFilter.created_at, PromptFilter.id)
    if filter_type is not None:
        q = q.where(PromptFilter.filter_type == filter_type)
    by_type: dict[int, list[str]] = {}
    for t, text in session.execute(q).all():
        by_type.setdefault(t, []).append(text)
    return [FilterRegex(filter_type=t, regex="|".join(texts)) for t, texts in by_type.items()]
