"""Remote storage fails (HTTP 429 from a throttled hub, 5xx, dropped connections): every remote call of the
data stage goes through with_retries, and what is still failing after the last attempt is one line.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from common.cli import InputError

# Retries of remote reads: a whole call again after 0.5 s, 1 s, 2 s, ... (capped, jittered). Generous,
# because a throttled hub answers 429 for minutes and a job of hours must not die of it.
RETRY_ATTEMPTS = 8
RETRY_FIRST_WAIT_S = 0.5
RETRY_MAX_WAIT_S = 30.0
TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

Result = TypeVar("Result")


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None) or getattr(err, "status", None)


def _transient_types() -> tuple[type[BaseException], ...]:
    """Errors of a connection that was made and then failed. Not failing to connect at all (no DNS, no
    route, refused): huggingface_hub already retried those, and a host that cannot be reached stays so."""
    types: list[type[BaseException]] = [ConnectionResetError, BrokenPipeError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client; its errors are not OSErrors
        if client := sys.modules.get(module):
            types += [client.TimeoutException, client.ReadError, client.WriteError, client.RemoteProtocolError]
    return tuple(types)


def is_transient(err: BaseException) -> bool:
    """Throttling, a server error or a dropped connection, anywhere in the exception's chain."""
    seen: BaseException | None = err
    while seen is not None:
        if _http_status(seen) in TRANSIENT_HTTP_STATUS or isinstance(seen, _transient_types()):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def with_retries(call: Callable[[], Result], what: str) -> Result:
    """`call()`, again with exponential backoff while it fails transiently; `what` names it in the notes.
    Still failing after the last attempt, it is one InputError line: a rerun resumes where the job stopped."""
    attempt = 1
    while True:
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == RETRY_ATTEMPTS:
                raise InputError(f"{what}: still failing after {RETRY_ATTEMPTS} attempts ({_short(err)}); "
                                 "rerun the same command to resume") from err
            wait = min(RETRY_MAX_WAIT_S, RETRY_FIRST_WAIT_S * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            print(f"note: {what}: {_short(err)}; retry {attempt}/{RETRY_ATTEMPTS - 1} in {wait:.1f}s",
                  file=sys.stderr)
            time.sleep(wait)
            attempt += 1


def _short(err: BaseException) -> str:
    status = _http_status(err)
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"HTTP {status}" if status else text[:200]
