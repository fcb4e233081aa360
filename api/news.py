"""The horde's news (`/status/news`): the operator's configs/news.yaml, newest first.

The file is read again whenever it changes (one stat per call), so an operator edits it in
place with no restart. RAYHORDE_NEWS_PATH names another file. A file that does not parse or
has a malformed item is logged, and the news it held before keeps being served (none, if it
never was valid): a typo of the operator's never turns the endpoint into a 500.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from api.status_schemas import Newspiece

log = logging.getLogger("rayhorde.api")
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "configs" / "news.yaml"
_items = TypeAdapter(list[Newspiece])


class NewsFile:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: tuple[str, float] | None = None  # (path, mtime) last read
        self._news: list[Newspiece] = []

    def current(self) -> list[Newspiece]:
        path = os.environ.get("RAYHORDE_NEWS_PATH") or str(DEFAULT_PATH)
        try:
            stamp = (path, os.stat(path).st_mtime)
        except OSError:
            log.error("news file %s cannot be read; serving no news", path)
            return []
        with self._lock:
            if stamp != self._seen:
                self._seen = stamp
                try:
                    with open(path, encoding="utf-8") as f:
                        loaded = _items.validate_python(yaml.safe_load(f) or [])
                    self._news = sorted(loaded, key=lambda n: n.date_published, reverse=True)
                except (OSError, yaml.YAMLError, ValidationError) as e:
                    log.error("news file %s is invalid, keeping the news read before: %s", path, e)
            return self._news


news = NewsFile()
