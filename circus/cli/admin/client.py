"""HTTP client of circus-admin: JSON in and out, errors mapped to exit codes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import requests

from circus.common.errors import (
    CircusError,
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

_BY_STATUS: dict[int, type[CircusError]] = {400: InvalidInput, 401: Unauthenticated,
                                            403: PermissionDenied, 404: NotFound, 409: Conflict,
                                            413: InvalidInput, 429: Unavailable}


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "circus-admin"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None, stream: bool = False) -> requests.Response:
        url = self.url + path
        try:
            response = self.session.request(method, url, json=json, params=params,
                                            timeout=self.timeout, stream=stream)
        except requests.RequestException as exc:
            raise Unavailable(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
                message, details = body.get("error", response.reason), body.get("details")
            except ValueError:
                message, details = f"{response.status_code} {response.reason}", None
            error = _BY_STATUS.get(response.status_code, Unavailable if
                                   response.status_code >= 500 else InvalidInput)
            raise error(message, details)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None}).json()

    def post(self, path: str, body: Any = None) -> Any:
        response = self.request("POST", path, json=body if body is not None else {})
        return response.json() if response.content else None

    def put(self, path: str, body: Any = None) -> Any:
        response = self.request("PUT", path, json=body if body is not None else {})
        return response.json() if response.content else None

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def pages(self, path: str, *, limit: int | None = None, **params: Any) -> Iterator[Any]:
        """Every item of a paginated list (or the first ``limit``)."""
        offset, seen = 0, 0
        while True:
            page = self.get(path, limit=min(500, limit or 500), offset=offset, **params)
            for item in page["items"]:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return
