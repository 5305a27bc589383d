"""A local, in-memory server that behaves like the 1ClickImpact API (carbon endpoints).

Real HTTP on loopback (stdlib :mod:`http.server`), so the real ``makeimpact``
SDK can be pointed at it by setting its ``base_url``. It reproduces what the
SDK sees from the real service: key checks (``test_`` keys for sandbox,
``live_`` for production), documented error bodies
(``{"type": ..., "message": ...}``), whole-pound validation, metadata on
records, cursor paging, carbon records that carry only ``carbon_captured``,
and faults to inject (status codes, slow answers, a capture whose response is
dropped, malformed JSON).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_RESERVED_METADATA = {"gift", "widgetID"}

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Fault:
    """A fault for the next matching request(s).

    Attributes:
        endpoint: ``"capture_carbon"``, ``"records"``, ``"whoami"``,
            ``"cancel_impact"``, ``"impact"`` or ``"*"`` for any.
        status: answer with this HTTP status (``None``: answer normally).
        body: JSON body for ``status`` (default: a documented ``api_error`` body).
        delay_s: sleep this long before answering (after acting on the request).
        stall_s: sleep this long before acting on the request (a slow server: the
            client's deadline may pass while the request is still to be processed).
        drop_after_capture: act on the request, then close the connection without answering.
        malformed: answer 200 with a body that is not JSON (after acting).
        times: how many requests this fault applies to.
    """

    endpoint: str = "capture_carbon"
    status: int | None = None
    body: dict[str, Any] | str | None = None
    delay_s: float = 0.0
    stall_s: float = 0.0
    drop_after_capture: bool = False
    malformed: bool = False
    times: int = 1


@dataclasses.dataclass
class CaptureRecord:
    """One carbon capture held by the server."""

    api_key_fingerprint: str
    user_id: str
    time_utc: str
    carbon_captured: int
    metadata: dict[str, str] | None
    cancelled_on: str | None = None


class FakeOneClickImpact:
    """Run a 1ClickImpact-compatible API on ``http://127.0.0.1:<port>``.

    Args:
        environment: ``"sandbox"`` (accepts keys starting ``test_``) or
            ``"production"`` (keys starting ``live_``).
        api_keys: if given, only these keys are valid (others get 401).
        host: address to bind; loopback only.
        port: 0 picks a free port.

    Example::

        with FakeOneClickImpact() as server:
            tracker_settings = {"offset_api_key": "test_demo", "offset_environment": "sandbox",
                                "offset_api_url": server.url}
    """

    def __init__(
        self,
        *,
        environment: str = "sandbox",
        api_keys: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if environment not in ("sandbox", "production"):
            raise ValueError("environment must be 'sandbox' or 'production'")
        self.environment = environment
        self.api_keys = set(api_keys) if api_keys is not None else None
        self._prefix = "test_" if environment == "sandbox" else "live_"
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._records: list[CaptureRecord] = []
        self._last_ms = 0
        self.delay_s = 0.0
        self.requests: list[tuple[str, str, int]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- control
    @property
    def url(self) -> str:
        """Base URL to give the SDK (``client.base_url``) or ``offset_api_url``."""
        if self._server is None:
            raise RuntimeError("the server is not running; call start() first")
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{name}:{port}"

    def start(self) -> FakeOneClickImpact:
        """Start serving on a background thread; returns ``self``."""
        if self._server is None:
            server = ThreadingHTTPServer((self._host, self._port), _make_handler(self))
            server.daemon_threads = True
            server.block_on_close = False
            self._server = server
            # one wake-up a second while idle: stop() wakes the loop with a connection instead of a
            # short poll, which woke the process 50 times a second and cost a training beside it CPU
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 1.0},
                name="fake-1clickimpact",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting connections. Requests already being answered (delayed ones too) still
        finish, on their own threads."""
        server, self._server = self._server, None
        if server is not None:
            stopping = threading.Thread(target=server.shutdown, name="fake-1clickimpact-stop", daemon=True)
            stopping.start()
            address = (str(self._host), int(server.server_address[1]))
            while stopping.is_alive():  # a connection wakes the serving loop, which then sees the request
                with contextlib.suppress(OSError), socket.create_connection(address, timeout=1):
                    pass
                stopping.join(0.05)
            server.server_close()

    def __enter__(self) -> FakeOneClickImpact:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, fault: Fault) -> None:
        """Queue a fault; faults apply in the order injected."""
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def captures(self) -> list[CaptureRecord]:
        """Every capture made (cancelled ones included), oldest first."""
        with self._lock:
            return list(self._records)

    def total_lb(self, api_key: str | None = None) -> int:
        """Pounds captured and not cancelled (for one key when given)."""
        fp = _fingerprint(api_key) if api_key else None
        with self._lock:
            return sum(
                r.carbon_captured
                for r in self._records
                if r.cancelled_on is None and (fp is None or r.api_key_fingerprint == fp)
            )

    # ------------------------------------------------------------ internals
    def _take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint in (endpoint, "*"):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _now(self) -> str:
        with self._lock:
            ms = max(int(time.time() * 1000), self._last_ms + 1)
            self._last_ms = ms
        return (
            dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
            + f"{ms % 1000:03d}Z"
        )

    def _key_ok(self, key: str | None) -> bool:
        if not key:
            return False
        if self.api_keys is not None:
            return key in self.api_keys
        return key.startswith(self._prefix) and len(key) > len(self._prefix)

    def _handle(
        self, method: str, path: str, query: dict[str, str], key: str | None, body: Any
    ) -> tuple[int, Any]:
        """Return (status, JSON body) for one request (faults are applied by the caller)."""
        if not self._key_ok(key):
            return 401, {"type": "key_error", "message": "API Key does not exist"}
        assert key is not None
        fp = _fingerprint(key)
        user_id = f"U{fp[:10]}"
        if method == "POST" and path == "/v1/capture_carbon":
            return self._capture(fp, user_id, body)
        if method == "GET" and path == "/v1/records":
            return self._list_records(fp, query)
        if method == "GET" and path == "/v1/whoami":
            return 200, {"user_id": user_id, "email": f"{user_id.lower()}@example.invalid"}
        if method == "POST" and path == "/v1/cancel_impact":
            return self._cancel(fp, body)
        if method == "GET" and path == "/v1/impact":
            total = self.total_lb(key)
            return 200, {
                "user_id": user_id,
                "carbon_captured": total,
                "user_impact": {"carbon_captured": total},
            }
        return 404, {"type": "invalid_request_error", "message": f"Unknown endpoint {method} {path}"}

    def _capture(self, fp: str, user_id: str, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return 400, {"type": "invalid_request_error", "message": "Body must be a JSON object"}
        amount = body.get("amount")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= 10_000_000:
            return 400, {
                "type": "invalid_request_error",
                "message": "amount must be a whole number of pounds between 1 and 10,000,000",
            }
        metadata = body.get("metadata")
        if metadata is not None:
            problem = _metadata_problem(metadata)
            if problem:
                return 400, {"type": "invalid_request_error", "message": problem}
        record = CaptureRecord(fp, user_id, self._now(), amount, dict(metadata) if metadata else None)
        with self._lock:
            self._records.append(record)
        return 200, {"user_id": user_id, "carbon_captured": amount, "time_utc": record.time_utc}

    def _list_records(self, fp: str, query: dict[str, str]) -> tuple[int, Any]:
        filter_by = query.get("filter_by")
        if filter_by not in (
            None,
            "carbon_captured",
            "tree_planted",
            "waste_removed",
            "money_donated",
            "coral_restored",
        ):
            return 400, {"type": "invalid_request_error", "message": f"Invalid filter_by {filter_by}"}
        try:
            limit = int(query.get("limit", "10"))
            start = int(query.get("cursor", "0"))
        except ValueError:
            return 400, {"type": "invalid_request_error", "message": "Invalid limit or cursor"}
        if not 1 <= limit <= 1000:
            return 400, {"type": "invalid_request_error", "message": "limit must be between 1 and 1000"}
        start_date, end_date = query.get("start_date"), query.get("end_date")
        with self._lock:
            records = [r for r in self._records if r.api_key_fingerprint == fp and r.cancelled_on is None]
        if filter_by not in (None, "carbon_captured"):
            records = []
        if start_date:
            records = [r for r in records if r.time_utc[:10] >= start_date]
        if end_date:
            records = [r for r in records if r.time_utc[:10] <= end_date]
        if query.get("sort_order") == "desc":
            records.reverse()
        page = records[start : start + limit]
        out: dict[str, Any] = {"user_records": [_record_json(r) for r in page]}
        if start + limit < len(records):
            out["cursor"] = str(start + limit)
        return 200, out

    def _cancel(self, fp: str, body: Any) -> tuple[int, Any]:
        body = body if isinstance(body, dict) else {}
        with self._lock:
            for record in self._records:
                if (
                    record.api_key_fingerprint == fp
                    and record.user_id == body.get("user_id")
                    and record.time_utc == body.get("time_utc")
                ):
                    record.cancelled_on = record.cancelled_on or dt.datetime.now(dt.timezone.utc).isoformat()
                    return 200, {
                        "user_id": record.user_id,
                        "time_utc": record.time_utc,
                        "cancelled_on": record.cancelled_on,
                        "message": "Impact cancelled",
                    }
        return 400, {"type": "invalid_request_error", "message": "No impact found for user_id and time_utc"}


def _describe(fault: Fault) -> str:
    """A short note of an injected fault for the request log."""
    notes = [
        label
        for label, on in (
            (f"injected status {fault.status}", fault.status is not None),
            (f"stalled {fault.stall_s:g} s", bool(fault.stall_s)),
            (f"delayed {fault.delay_s:g} s", bool(fault.delay_s)),
            ("connection dropped", fault.drop_after_capture),
            ("malformed body", fault.malformed),
        )
        if on
    ]
    return "fault: " + ", ".join(notes) if notes else "fault"


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _record_json(record: CaptureRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "user_id": record.user_id,
        "time_utc": record.time_utc,
        "carbon_captured": record.carbon_captured,
    }
    if record.metadata:
        out["metadata"] = record.metadata
    return out


def _metadata_problem(metadata: Any) -> str | None:
    if not isinstance(metadata, dict):
        return "metadata must be an object of string keys and values"
    if len(metadata) > 20:
        return "metadata can hold at most 20 key-value pairs"
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return "metadata keys and values must be strings"
        if len(key) > 40 or len(value) > 500:
            return "metadata keys are limited to 40 characters and values to 500"
        if key in _RESERVED_METADATA:
            return f"metadata key {key} is reserved"
    return None


def _make_handler(fake: FakeOneClickImpact) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- quiet
            pass

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                body = None
            endpoint = parts.path.rsplit("/", 1)[-1]
            fault = fake._take_fault(endpoint)
            if fault is not None and fault.stall_s:
                time.sleep(fault.stall_s)
            if fault is not None and fault.status is not None:
                status, payload = (
                    fault.status,
                    fault.body or {"type": "api_error", "message": "Internal error"},
                )
            else:
                status, payload = fake._handle(method, parts.path, query, self.headers.get("x-api-key"), body)
            fake.requests.append((method, parts.path, status))
            # INFO per request (`carbonoffset fake-server -v`): never the key, nor the metadata
            logger.info(
                "%s %s -> %d%s",
                method,
                parts.path + (f"?{parts.query}" if parts.query else ""),
                status,
                f" ({_describe(fault)})" if fault is not None else "",
            )
            delay = fake.delay_s + (fault.delay_s if fault else 0.0)
            if delay:
                time.sleep(delay)
            if fault is not None and fault.drop_after_capture:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None and fault.malformed:
                data = b"<html>502 Bad Gateway</html"
                status = 200
            elif isinstance(payload, str):
                data = payload.encode()
            else:
                data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass

        def do_GET(self) -> None:  # noqa: N802
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

    return Handler
