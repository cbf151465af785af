"""Keep credentials inside the process: one function every outgoing text passes.

Text leaves an engine as error strings (stored in the ``error`` column of
Parquet rows, counted in manifests and Prefect artifacts, printed in
summaries), as generated text, as exception messages and as the config dump in
every manifest. A server may put anything into those: a proxy that answers
401 by echoing the request headers, a debug server that echoes the whole
request, an httpx error that quotes a URL with ``user:password@`` in it. So the
engine passes every such string through :func:`redact` before handing it on,
instead of trusting each call site to leave the key out.

What is removed:

- every exact secret value the caller names (the API key read from
  ``--api-key-env``), also in its URL-encoded and JSON-escaped forms;
- ``Authorization`` / ``Proxy-Authorization`` / ``X-Api-Key`` / ``api-key``
  header values, in ``Name: value`` and JSON ``"name": "value"`` forms;
- ``Bearer ...`` / ``Basic ...`` credentials wherever they stand;
- OpenAI-style (``sk-...``) and Hugging Face (``hf_...``) tokens;
- the ``user:password@`` part of URLs and key-like query parameters
  (``?api_key=``, ``&token=``, ``&sig=`` ...).

Redaction runs on the whole text before any truncation, so a key cut in half
by ``text[:300]`` can never slip through as a fragment.
"""

from __future__ import annotations

import json
import re
from typing import Iterable
from urllib.parse import quote

MASK = "[REDACTED]"

# `Authorization: Bearer abc`, `"authorization": "Bearer abc"`, `x-api-key=abc`
_HEADER = re.compile(
    r"(?i)((?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]?token|client[-_]?secret)"
    r"(\\?[\"']?\s*[:=]\s*\\?[\"']?)"
    r"((?:bearer|basic|token)\s+)?[^\s\"'\\,;&}\]]+"
)
_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+)(?!\[REDACTED\])[A-Za-z0-9._~+/=-]{4,}")
_TOKENS = re.compile(r"\b(sk-|sk_|hf_)[A-Za-z0-9_-]{8,}")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@\"']+@")
_QUERY = re.compile(r"(?i)([?&](?:api[-_]?key|key|token|access[-_]?token|sig|signature|secret|password)=)[^&\s\"'#]+")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every credential replaced by ``[REDACTED]``; pure, never raises on str input."""
    if not text:
        return text
    for s in secrets:
        if s and len(s) >= 4:  # shorter values would mask ordinary words
            for form in {s, quote(s, safe=""), json.dumps(s)[1:-1]}:
                text = text.replace(form, MASK)
    text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    text = _SCHEME.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    text = _TOKENS.sub(lambda m: m.group(1) + MASK, text)
    text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _QUERY.sub(lambda m: m.group(1) + MASK, text)
    return text
