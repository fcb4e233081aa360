"""Prompt filters: moderators' regexes over prompts (the AI Horde's `/v2/filters` API) and the
CSAM guard they drive at image submit.

A filter is a regex, matched case-insensitively anywhere in the text, with a `filter_type`
(10..29). The types that act:

- 10: terms about minors. Part one of the CSAM guard. Such a filter may carry a `replacement`.
- 11: sexual terms. Part two of the CSAM guard.
- 20: blocked outright (a generic blacklist).

Types 12..19 and 21..29 may be stored, listed and checked with `POST /v2/filters`, but they
have no effect on requests yet.

At `POST /v2/generate/async` (dry runs too) only the positive part of the prompt (before `###`)
is screened; the negative part says what *not* to draw, so it is never checked.

- A prompt matching any type-20 filter is refused: 400 `CorruptPrompt`, "prompt: matches a
  blocked term". It is not held against the user.
- A prompt matching at least one type-10 filter and at least one type-11 filter is refused with
  400 `CorruptPrompt` and the AI Horde's terms-of-service message, and the user's
  `users.suspicion` is raised by one in a transaction of its own. With `replacement_filter`
  (the default) and a non-empty `replacement` on *every* type-10 filter that matched, the
  matches are replaced instead, the prompt is screened again, and the request goes on with
  the replaced prompt and a `PromptReplaced` warning. (A dry run is refused the same way but,
  having no user at hand, counts nothing.)

Each API replica keeps the compiled filters in memory (`store.FilterCache`) and polls one row,
`prompt_filter_version`, every `filter_refresh_seconds`; every change raises that version in
its own transaction, so an addition, change or deletion reaches every replica within that time.

Modules: `protocol` (wire schemas), `store` (database, cache, screening), `router` (routes).
This package's `__init__` imports nothing, so `api.images` can use `store` without a cycle.
"""
