"""The agent's sync client: outbox -> `POST {central.url}/api/v1/ingest` (SPEC §6).

One round (`sync_once`) first checks the token with a conditional `GET {central.url}/api/v1/gateways/{id}/desired`
(SPEC §9; a 304 after the first round): a wrong or revoked token shows as the sync error at once, at start and in
every round, even with nothing to send (a 404, from a central without that route, leaves the check to the ingest).
Then it sends batches until the outbox is empty or central cannot take more: events first, then
summaries, oldest first, `batch_size` records a batch, gzip-compressed, over one keep-alive session. A record
leaves the outbox only when central answered 200 for its batch, with its answer for exactly those records (a 200
with anything else, e.g. a captive portal's page, is transient); a batch that was sent but not answered is simply
sent again (ids are deterministic, central counts it as duplicates). Errors are classified where they happen:
- network errors, 429 and 5xx: transient — retry later with exponential backoff and jitter, `Retry-After` honoured;
- 401 and 403: the gateway is not allowed — stop, keep everything, say so loudly; try again much later; likewise
  any other 4xx but 408/413/422/429 (central cannot read what this agent sends);
- 413: the batch is too large — split it in halves; a single record too large is set aside;
- 422: invalid — split to isolate the invalid records, set those aside with central's reason, send the rest.
Who calls it: one thread of the agent, never concurrently.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

import requests
from pydantic import ValidationError

from sync.config import CentralConfig
from sync.protocol import GatewayStatus, IngestResult, escape_controls

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 300.0
REFUSED_RETRY_S = 900.0  # after 401/403: central may re-enable the gateway; a new token needs a restart anyway


class Record(Protocol):
    kind: str  # "event" | "summary"
    record_id: str
    body: str  # JSON of sync.protocol.Event or Summary


class Outbox(Protocol):
    def pending(self, limit: int) -> list[Record]: ...  # events first, then summaries, oldest first
    def mark_synced(self, record_ids: Sequence[str]) -> None: ...
    def set_aside(self, records: Sequence[Record], reason: str) -> None: ...


class Outcome(StrEnum):
    SYNCED = "synced"  # the outbox is empty
    RETRY = "retry"  # transient failure: try again after `retry_after`
    REFUSED = "refused"  # 401/403: the gateway is not allowed


@dataclass(frozen=True, slots=True)
class Round:
    outcome: Outcome
    sent: int  # records central accepted or already had
    set_aside: int
    retry_after: float  # seconds until the next round
    error: str | None = None


@dataclass(slots=True)
class _Tally:
    sent: int = 0
    set_aside: int = 0


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Refused(Exception):
    pass


class SyncClient:
    def __init__(self, config: CentralConfig, gateway_id: str, agent_version: str, outbox: Outbox,
                 gateway_status: Callable[[], GatewayStatus], session: requests.Session | None = None) -> None:
        self._config = config
        self._url = str(config.url).rstrip("/") + "/api/v1/ingest"
        self._desired_url = str(config.url).rstrip("/") + f"/api/v1/gateways/{gateway_id}/desired"
        self._desired_etag: str | None = None
        self._gateway_id = gateway_id
        self._agent_version = agent_version
        self._outbox = outbox
        self._gateway_status = gateway_status
        self._session = session or requests.Session()
        self._session.headers.update({
            "Authorization": f"Bearer {config.token.get_secret_value()}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": f"pdm-edge/{agent_version}",
        })
        self._session.verify = str(config.ca_file) if config.ca_file else True
        self._failures = 0
        self.last_success: datetime | None = None
        self.last_error: str | None = None

    def sync_once(self) -> Round:
        # Counted as it happens: a round that fails halfway through a split batch still reports what it did.
        done = _Tally()
        try:
            self._check_token()
            while records := self._outbox.pending(self._config.batch_size):
                self._send(records, done)
        except _Transient as exc:
            self._failures += 1
            self.last_error = str(exc)
            delay = exc.retry_after if exc.retry_after is not None else self._backoff()
            return Round(Outcome.RETRY, done.sent, done.set_aside, delay, str(exc))
        except _Refused as exc:
            self.last_error = str(exc)
            log.error("central refused this gateway, syncing stopped, nothing is deleted: %s", exc)
            return Round(Outcome.REFUSED, done.sent, done.set_aside, REFUSED_RETRY_S, str(exc))
        self._failures = 0
        self.last_success = datetime.now(UTC)
        return Round(Outcome.SYNCED, done.sent, done.set_aside, self._config.sync_interval_s)

    def close(self) -> None:
        self._session.close()

    def _backoff(self) -> float:
        ceiling = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(self._failures, 16))
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter": never hammers, never all gateways at once

    def _check_token(self) -> None:
        """_Refused on 401/403, _Transient when central cannot answer now; anything else goes on to the ingest."""
        headers = {"Content-Type": None, "Content-Encoding": None}  # a GET without a body
        if self._desired_etag:
            headers["If-None-Match"] = self._desired_etag
        try:
            response = self._session.get(self._desired_url, headers=headers, timeout=self._config.timeout_s,
                                         allow_redirects=False)
        except requests.RequestException as exc:
            raise _Transient(f"cannot reach central: {exc.__class__.__name__}: {exc}") from exc
        except ValueError as exc:
            raise _Transient(f"central's answer cannot be read: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            raise _Refused(f"{response.status_code}: {_reason(response)}")
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"central answered {response.status_code}: {_reason(response)}", _retry_after(response))
        if response.status_code == 200:
            _check_desired(response)
            self._desired_etag = response.headers.get("ETag")

    def _send(self, records: list[Record], done: _Tally) -> None:
        """Send, and count in `done` the records central now has and those set aside."""
        response = self._post(records)
        if response.status_code == 200:
            _check_answer(response, records)
            self._outbox.mark_synced([r.record_id for r in records])
            done.sent += len(records)
            return
        if response.status_code in (413, 422):
            reason = _reason(response)
            if len(records) == 1:
                log.warning("central refused %s %s, set aside: %s", records[0].kind, records[0].record_id, reason)
                self._outbox.set_aside(records, f"{response.status_code}: {reason}")
                done.set_aside += 1
                return
            half = len(records) // 2
            self._send(records[:half], done)
            self._send(records[half:], done)
            return
        if response.status_code in (401, 403):
            raise _Refused(f"{response.status_code}: {_reason(response)}")
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            # 400, 415...: central cannot read what this agent sends; resending is pointless, deleting is wrong.
            raise _Refused(f"{response.status_code} (is central compatible with this agent?): {_reason(response)}")
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"central answered {response.status_code}: {_reason(response)}",
                             _retry_after(response))
        raise _Transient(f"unexpected answer {response.status_code} from central: {_reason(response)}")

    def _post(self, records: list[Record]) -> requests.Response:
        body = gzip.compress(self._body(records), 5)
        try:
            # No redirects: central never redirects an ingest, and following one would send the batch and the token
            # elsewhere.
            return self._session.post(self._url, data=body, timeout=self._config.timeout_s, allow_redirects=False)
        except requests.RequestException as exc:
            raise _Transient(f"cannot reach central: {exc.__class__.__name__}: {exc}") from exc
        except ValueError as exc:  # e.g. UnicodeDecodeError: requests reads a Location that is not UTF-8 even then
            raise _Transient(f"central's answer cannot be read: {exc.__class__.__name__}: {exc}") from exc

    def _body(self, records: list[Record]) -> bytes:
        """The IngestBatch as JSON, assembled from the stored records' JSON without parsing them again."""
        events = ",".join(r.body for r in records if r.kind == "event")
        summaries = ",".join(r.body for r in records if r.kind == "summary")
        head = {
            "gateway_id": self._gateway_id,
            "batch_id": str(uuid.uuid4()),
            "sent_at": datetime.now(UTC).isoformat(),
            "agent_version": self._agent_version,
            "gateway": self._gateway_status().model_dump(mode="json"),
        }
        return (json.dumps(head)[:-1] + f', "events": [{events}], "summaries": [{summaries}]}}').encode()


def _check_answer(response: requests.Response, records: list[Record]) -> None:
    """A 200 counts only as central's answer for exactly these records: a proxy or captive portal answering 200
    with a page of its own must not make records leave the outbox that central never stored."""
    try:
        result = IngestResult.model_validate_json(response.content)
    except ValidationError:
        raise _Transient(f"central answered 200 with something that is not its answer: {_reason(response)}") from None
    answered = result.accepted.summaries + result.duplicates.summaries + result.accepted.events \
        + result.duplicates.events
    if answered != len(records):
        raise _Transient(f"central answered for {answered} records, not the {len(records)} sent")


def _check_desired(response: requests.Response) -> None:
    """A 200 is central's desired state only when it reads as one (a captive portal's page is not: transient)."""
    try:
        answer = response.json()
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("revision"), int):
        raise _Transient(f"central answered 200 with something that is not its desired state: {_reason(response)}")


def _reason(response: requests.Response) -> str:
    """Central's error message, its control characters escaped: it ends up on terminals and the status page."""
    try:
        error = response.json()["error"]
        details = error.get("details")
        reason = error["message"] + (f" ({json.dumps(details)[:500]})" if details else "")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: deeply nested JSON
        reason = response.text[:200] or response.reason or "no reason given"
    return escape_controls(str(reason))


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date, or nothing: our own backoff
    if math.isnan(seconds):  # max() and min() would pass NaN through, and a wait of NaN does not wait at all
        return None
    return min(max(seconds, 0.0), BACKOFF_MAX_S)
