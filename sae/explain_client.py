"""A minimal client for OpenAI-compatible chat endpoints (standard library only).

`POST {endpoint}/chat/completions` with `{model, messages, temperature, max_tokens}`, the reply's
`choices[0].message.content` returned. Served by llama.cpp, vLLM, Ollama (`/v1`) and hosted APIs
alike. 429 and 5xx answers and timeouts are retried with exponential backoff (a `Retry-After`
header is honoured up to a minute); a refused connection, any other HTTP error, or a reply that
is not the expected JSON is an `EndpointError` with one line naming the URL. The key comes from
an environment variable and lives only in the request header.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import NamedTuple

from workbench.errors import WorkbenchError

BACKOFF_S = 1.0
"""First retry's wait in seconds; doubled at each further retry."""
_RETRIED = {408, 409, 429, 500, 502, 503, 504}
_HINTS = {
    401: " (check --api-key-env)",
    403: " (check --api-key-env)",
    404: " (check --endpoint, usually ending in /v1, and --model)",
}


class EndpointError(WorkbenchError):
    """An endpoint that cannot be reached, refuses a request, or answers something unreadable."""


class Reply(NamedTuple):
    text: str
    """The message content ("" when the server sent none)."""
    prompt_tokens: int
    completion_tokens: int


def chat_url(endpoint: str) -> str:
    """`{endpoint}/chat/completions`, unless the endpoint already names that path."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"


class ChatClient:
    """Thread-safe (one request per call); counts the tokens the server reports using."""

    def __init__(self, endpoint: str, *, timeout: float = 120.0, retries: int = 4, api_key_env: str = ""):
        self.url = chat_url(endpoint)
        self.timeout, self.retries = timeout, retries
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise EndpointError(f"--api-key-env {api_key_env}: that environment variable is not set")
            self._headers["Authorization"] = f"Bearer {key}"
        self._lock = threading.Lock()
        self.prompt_tokens = self.completion_tokens = self.requests = 0

    def chat(self, model: str, messages: list[dict], *, temperature: float, max_tokens: int) -> Reply:
        """The reply to `messages` ([{"role", "content"}]) from `model`. Raises EndpointError."""
        body = json.dumps(
            {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        ).encode()
        raw = self._post(body)
        try:
            obj = json.loads(raw)
            message = obj["choices"][0]["message"]
            text = message.get("content") or ""
        except json.JSONDecodeError:
            raise EndpointError(f"{self.url}: the reply is not JSON ({_snippet(raw)})") from None
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(
                f"{self.url}: the reply has no choices[0].message ({_snippet(raw)})"
            ) from None
        usage = obj.get("usage") or {}
        reply = Reply(
            str(text), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        )
        with self._lock:
            self.requests += 1
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens
        return reply

    def _post(self, body: bytes) -> bytes:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                detail = _snippet(exc.read())
                if exc.code not in _RETRIED or last:
                    hint = _HINTS.get(exc.code, "")
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise EndpointError(f"{self.url}: HTTP {exc.code}{tries}{hint}: {detail}") from None
                time.sleep(_wait(attempt, exc.headers.get("Retry-After")))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                transient = isinstance(reason, (TimeoutError, socket.timeout, ConnectionResetError))
                if transient and not last:
                    time.sleep(_wait(attempt, None))
                    continue
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise EndpointError(
                        f"{self.url}: no reply within {self.timeout:g} s after {attempt + 1} tries "
                        "(raise --timeout?)"
                    ) from None
                if isinstance(reason, http.client.HTTPException):
                    raise EndpointError(f"{self.url}: not an HTTP reply ({_reason(reason)})") from None
                raise EndpointError(
                    f"cannot reach {self.url} ({_reason(reason)}); is the server running?"
                ) from None
        raise AssertionError("unreachable")


def _wait(attempt: int, retry_after: str | None) -> float:
    try:
        asked = float(retry_after) if retry_after else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        asked = 0.0
    return max(min(asked, 60.0), BACKOFF_S * 2**attempt)


def _reason(reason: object) -> str:
    text = getattr(reason, "strerror", None) or str(reason)
    return " ".join(str(text).split()) or type(reason).__name__


def _snippet(raw: bytes, width: int = 160) -> str:
    text = " ".join(raw.decode("utf-8", "replace").split())
    return (text[:width] + "…") if len(text) > width else (text or "empty body")
