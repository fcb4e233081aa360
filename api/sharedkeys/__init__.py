"""Shared keys (the AI Horde's `/v2/sharedkeys`): a user lends their kudos. Whoever holds a
shared key sends it as `apikey` on `POST /generate/async` or `/generate/text/async`; the key's
owner pays for the request, within the key's limits:

- `kudos`: what the key may still spend (-1: no limit). A request that costs more than that,
  less what its unfinished requests will still cost, is refused (403
  `SharedKeyInsufficientKudos`); a key with nothing left is refused outright (403
  `SharedKeyEmpty`). What its requests cost comes off `kudos` and adds to `utilized` as their
  generations finish (censored images cost nothing, as for any requester).
- `expiry` (days from creation or from the last change; -1 never): an expired key is refused
  (403 `SharedKeyExpired`).
- `max_image_pixels`, `max_image_steps`, `max_text_tokens` per request (-1: no limit): a
  request over them is refused (400 naming the field).
- The owner's own rules apply as usual: the request counts against the owner's concurrency
  cap, and needs kudos upfront from the owner's balance where the AI Horde asks for them.

A user has at most 3 keys (trusted users 10, education accounts 1000), as on the AI Horde.
Deleting a key cancels what its requests have not finished, as the AI Horde does; a deleted
key is then an unknown API key (401).

The secret. On the AI Horde the key's id is the secret: the id that `PUT /sharedkeys`
returns is what its holders send as `apikey`, and what `GET`, `PATCH` and `DELETE
/sharedkeys/{id}` take. Clients (horde-sdk's strict models included) know no other field, so
the wire `id` stays the secret here too: a random UUID, returned by the creation, and echoed
back only to callers who send it. What is stored is a salted SHA-256 digest of it
(`shared_keys.key_hash`), never the secret; the row's own id (logs, the ledger of which
requests a key paid for) is another random UUID that is never shown. So the database holds no
usable key, and no answer reveals a key the caller does not already hold. (The AI Horde lists
a user's key ids in `/find_user`'s `sharedkey_ids`; this horde cannot, not storing them, and
leaves that optional field out.)

Modules: `protocol` (wire schemas), `service` (the rules), `router` (routes).
"""
