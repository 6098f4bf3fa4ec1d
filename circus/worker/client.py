"""The worker's side of /api/v1/workers (blocking HTTP, one session per thread)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable
from typing import IO, Any, Protocol

import requests

from circus.common.messaging import WORKER_NAME_HEADER


class ServerAccess(Protocol):
    """Where and how to reach the server: ``[worker]``, or an evaluator's upload target."""

    @property
    def server_url(self) -> str: ...
    @property
    def token(self) -> str | None: ...
    @property
    def request_timeout_secs(self) -> float: ...
    @property
    def ca_file(self) -> str | None: ...


class ApiError(Exception):
    """The server refused a call (4xx/5xx); ``status`` and its ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class WorkerApi:
    def __init__(self, config: ServerAccess, name: str) -> None:
        self.base = config.server_url.rstrip("/") + "/api/v1/workers"
        self.name = name
        self.headers = {"Authorization": f"Bearer {config.token}", WORKER_NAME_HEADER: name}
        self.timeout = config.request_timeout_secs
        self.verify: str | bool = config.ca_file or True
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self.headers)
            session.verify = self.verify
            self._local.session = session
        return session

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, self.base + path, **kwargs)
        if response.status_code >= 400:
            try:
                message = str(response.json().get("error"))
            except ValueError:
                message = response.text[:500]
            response.close()
            raise ApiError(response.status_code, message)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._call(method, path, **kwargs).json()

    # ------------------------------------------------------------ calls

    def heartbeat(self, systems: list[str], features: list[str], mandatory: list[str],
                  slots: int, running: int, timeout: float | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = self._json("POST", "/heartbeat", json={
            "systems": systems, "supported_features": features,
            "mandatory_features": mandatory, "slots": slots, "running": running,
            "hostname": socket.gethostname(), "pid": os.getpid()},
            timeout=timeout or self.timeout)
        return answer

    def claim(self, queue_class: str, limit: int = 1) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = self._json(
            "POST", "/claim", json={"queue_class": queue_class, "limit": limit})["steps"]
        return steps

    def renew(self, step_ids: Iterable[int], timeout: float | None = None) -> set[int]:
        """Extend the leases; returns the steps no longer held. ``timeout`` bounds the
        whole wait (a renewal answered after the lease lapsed is worth nothing)."""
        return set(self._json("POST", "/renew", json={"step_ids": sorted(step_ids)},
                              timeout=timeout or self.timeout)["lost"])

    def release(self, step_ids: Iterable[int]) -> list[int]:
        released: list[int] = self._json(
            "POST", "/release", json={"step_ids": sorted(step_ids)})["released"]
        return released

    def leave(self) -> list[int]:
        released: list[int] = self._json("POST", "/leave")["released"]
        return released

    def log(self, step_id: int, data: bytes) -> bool:
        """Append to the step's log; True when the server's cap cut it."""
        return bool(self._json("POST", f"/steps/{step_id}/log", data=data, headers={
            "Content-Type": "application/octet-stream"})["truncated"])

    def upload_outputs(self, step_id: int, source: IO[bytes]) -> list[str]:
        imported: list[str] = self._json(
            "PUT", f"/steps/{step_id}/outputs", data=source,
            headers={"Content-Type": "application/octet-stream"},
            timeout=(self.timeout, 3600))["imported"]
        return imported

    def upload_outputs_of(self, step_ids: list[int], source: IO[bytes]) -> list[str]:
        """The outputs of several held steps (a batch) as one export stream."""
        imported: list[str] = self._json(
            "PUT", "/outputs", data=source, params={"step": sorted(step_ids)},
            headers={"Content-Type": "application/octet-stream"},
            timeout=(self.timeout, 3600))["imported"]
        return imported

    def finish_many(self, reports: list[dict[str, Any]]) -> dict[int, str]:
        """Report several held steps' outcomes (each with its ``step_id``) at once."""
        statuses: dict[str, str] = self._json("POST", "/finish",
                                              json={"reports": reports})["statuses"]
        return {int(step_id): status for step_id, status in statuses.items()}

    def finish(self, step_id: int, **report: Any) -> str:
        status: str = self._json("POST", f"/steps/{step_id}/finish", json=report)["status"]
        return status

    # ------------------------------------------------------------ evaluators

    def missing_derivations(self, paths: list[str], evaluation_id: int) -> list[str]:
        """Those of ``paths`` (a .drv closure) the server's store lacks."""
        missing: list[str] = self._json(
            "POST", "/derivations/missing",
            json={"paths": paths, "evaluation": evaluation_id})["missing"]
        return missing

    def upload_derivations(self, source: IO[bytes], evaluation_id: int) -> list[str]:
        imported: list[str] = self._json(
            "PUT", "/derivations", data=source, params={"evaluation": evaluation_id},
            headers={"Content-Type": "application/octet-stream"},
            timeout=(self.timeout, 3600))["imported"]
        return imported
