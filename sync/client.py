"""The agent's sync client: outbox -> `POST {central.url}/api/v1/ingest` (SPEC §6).

One round (`sync_once`) first asks for the desired state with a conditional `GET {central.url}/api/v1/gateways/{id}/
desired` (SPEC §9; a 304 when nothing changed), which hands a changed one to the downlink (agent/downlink.py) and
doubles as the token check: a wrong or revoked token shows as the sync error at once, at start and in every round,
even with nothing to send (a 404, from a central without that route, leaves the check to the ingest). What the
gateway applied travels in every batch's `gateway` object; when it changed and nothing else is to be sent, the round
posts an empty batch to say so. `fetch()` downloads a bundle for the downlink's thread, over a session of its own.
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
Actions technicians took on alarm episodes (SPEC §10) ride along: the pending ones go in the first batch of a round
that holds the last of its events (or a batch of their own when nothing else is pending), and leave their outbox
only for central's answer naming them; those whose episode central does not know yet wait for the next round.
A central older than actions refuses the key (422 on `actions`) or ignores it (a 200 without `actions`): the agent
then sends the same batch without them, keeps them, says so once, and offers them again after ACTIONS_RETRY_S —
never splits or sets a record aside over them. Upgrade central before the gateways.
Each desired state central answers (a new ETag: a new revision, or a change in its acknowledgements) also hands its
`acknowledgements` (central's, SPEC §10) to the action outbox, for the technician's page.
Who calls it: one thread of the agent, never concurrently.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import requests
from pydantic import ValidationError

from sync.config import CentralConfig
from sync.desired import DesiredState
from sync.outbox import ActionOutbox, ActionRecord, DesiredSink, FetchError, Outbox, Outcome, Record, Round
from sync.protocol import GatewayStatus, IngestResult, escape_controls

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 300.0
REFUSED_RETRY_S = 900.0  # after 401/403: central may re-enable the gateway; a new token needs a restart anyway
ACTIONS_RETRY_S = 900.0  # after a central that does not take actions: it may have been upgraded meanwhile
MAX_ACTIONS = 500  # per batch


MAX_BUNDLE_BYTES = 64 * 2**20


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
                 gateway_status: Callable[[], GatewayStatus], session: requests.Session | None = None,
                 downlink: DesiredSink | None = None,
                 actions: ActionOutbox | None = None) -> None:
        if config.url is None or config.token is None:  # CentralConfig refuses a url without a token
            raise ValueError("a sync client needs central.url and central.token")
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
        # Passed with every request too: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment override
        # a session's verify, which would silently ignore central.ca_file (found by tests/deploy/test_compose.py).
        self._verify: str | bool = str(config.ca_file) if config.ca_file else True
        self._session.verify = self._verify
        self._base = str(config.url).rstrip("/")
        self._downlink = downlink
        # Bundles are fetched by the downlink's thread: a session of its own (requests' sessions are not shared
        # between threads), with the same token and CA.
        self._fetcher = requests.Session()
        self._fetcher.headers.update({"Authorization": f"Bearer {config.token.get_secret_value()}",
                                      "User-Agent": f"pdm-edge/{agent_version}"})
        self._fetcher.verify = self._session.verify
        self._failures = 0
        self._reported_applied: object = None  # the `applied` central last acknowledged (SPEC §9)
        self._sending_applied: object = None
        self._actions = actions
        self._actions_refused_until = 0.0  # time.monotonic(): until then, central is taken not to accept actions
        self.actions_error: str | None = None  # why actions are kept back, while they are
        self.last_success: datetime | None = None
        self.last_error: str | None = None

    def sync_once(self) -> Round:
        # Counted as it happens: a round that fails halfway through a split batch still reports what it did.
        done = _Tally()
        try:
            self._check_token()
            tried: set[str] = set()  # actions sent this round: those central could not place wait for the next
            while True:
                records = self._outbox.pending(self._config.batch_size)
                # After the events: an action's episode may open with an event still to send in this round.
                more_events = len(records) == self._config.batch_size and records[-1].kind == "event"
                actions = [] if more_events else self._pending_actions(tried)
                if not records and not actions:
                    break
                tried.update(a.record_id for a in actions)
                self._send(records, done, actions)
            if self._gateway_status().applied != self._reported_applied:
                self._send([], done)  # nothing to send, but what the gateway runs changed: central must know
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
        return Round(Outcome.SYNCED, done.sent, done.set_aside,
                     min(self._config.sync_interval_s, self._config.poll_s))

    def reconfigure(self, config: CentralConfig) -> None:
        """Take remote overrides of the round's timing (sync/remote.py); url and token never change here."""
        self._config = self._config.model_copy(update={"sync_interval_s": config.sync_interval_s,
                                                       "poll_s": config.poll_s})

    def fetch(self, path: str) -> bytes:
        """The body of `GET {central.url}{path}` (a model bundle), at most MAX_BUNDLE_BYTES; FetchError when it
        cannot be had now. Called from the downlink's thread."""
        try:
            with self._fetcher.get(self._base + path, timeout=self._config.timeout_s, stream=True, verify=self._verify,
                                   allow_redirects=False) as response:
                if response.status_code != 200:
                    raise FetchError(f"central answered {response.status_code} for {path}: {_reason(response)}")
                chunks, size = [], 0
                for chunk in response.iter_content(1 << 16):
                    size += len(chunk)
                    if size > MAX_BUNDLE_BYTES:
                        raise FetchError(f"{path} is larger than {MAX_BUNDLE_BYTES:,} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except requests.RequestException as exc:
            raise FetchError(f"cannot reach central: {exc.__class__.__name__}") from exc

    def close(self) -> None:
        self._session.close()
        self._fetcher.close()

    def _backoff(self) -> float:
        ceiling = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(self._failures, 16))
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter": never hammers, never all gateways at once

    def _check_token(self) -> None:
        """_Refused on 401/403, _Transient when central cannot answer now; anything else goes on to the ingest."""
        headers: dict[str, str | None] = {"Content-Type": None, "Content-Encoding": None}  # a GET without a body
        if self._desired_etag:
            headers["If-None-Match"] = self._desired_etag
        try:
            response = self._session.get(self._desired_url, headers=headers, timeout=self._config.timeout_s,
                                         verify=self._verify,
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
            desired = _check_desired(response)
            if self._downlink is not None:
                self._downlink.offer(desired)
            if self._actions is not None:
                self._actions.central_acknowledged(desired.acknowledgements)
            self._desired_etag = response.headers.get("ETag")

    def _pending_actions(self, tried: set[str]) -> list[ActionRecord]:
        if self._actions is None or time.monotonic() < self._actions_refused_until:
            return []
        return [a for a in self._actions.pending_actions(MAX_ACTIONS) if a.record_id not in tried]

    def _actions_refused(self, why: str) -> None:
        self._actions_refused_until = time.monotonic() + ACTIONS_RETRY_S
        if self.actions_error is None:
            log.warning("central does not take gateway actions (acknowledgements, labels): %s; they are kept and "
                        "offered again every %.0f min: upgrade central", why, ACTIONS_RETRY_S / 60)
        self.actions_error = f"central does not take gateway actions: {why}; upgrade central (they are kept)"

    def _send(self, records: Sequence[Record], done: _Tally, actions: Sequence[ActionRecord] = ()) -> None:
        """Send, and count in `done` the records central now has and those set aside."""
        response = self._post(records, actions)
        if actions and response.status_code == 422 and _about_actions(response):
            self._actions_refused(f"422 {_reason(response)}")
            return self._send(records, done)
        if response.status_code == 200:
            result = _check_answer(response, records)
            self._reported_applied = self._sending_applied
            if actions:
                self._actions_answered(result, actions)
            if records:
                self._outbox.mark_synced([r.record_id for r in records])
            done.sent += len(records)
            return
        if actions and response.status_code in (413, 422):
            return self._send(records, done) if records else None  # the actions wait for the next round
        if response.status_code in (413, 422) and not records:
            raise _Transient(f"central refused a status report ({response.status_code}): {_reason(response)}")
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

    def _actions_answered(self, result: IngestResult, actions: Sequence[ActionRecord]) -> None:
        if self._actions is None:
            return
        if result.actions is None:  # a central that read the batch without its actions
            self._actions_refused("its answer does not mention them")
            return
        unknown = {str(a) for a in result.actions.unknown}
        self._actions.mark_actions_synced([a.record_id for a in actions if a.record_id not in unknown])
        self.actions_error = None

    def _post(self, records: Sequence[Record], actions: Sequence[ActionRecord] = ()) -> requests.Response:
        body = gzip.compress(self._body(records, actions), 5)
        try:
            # No redirects: central never redirects an ingest, and following one would send the batch and the token
            # elsewhere.
            return self._session.post(self._url, data=body, timeout=self._config.timeout_s, allow_redirects=False,
                                      verify=self._verify)
        except requests.RequestException as exc:
            raise _Transient(f"cannot reach central: {exc.__class__.__name__}: {exc}") from exc
        except ValueError as exc:  # e.g. UnicodeDecodeError: requests reads a Location that is not UTF-8 even then
            raise _Transient(f"central's answer cannot be read: {exc.__class__.__name__}: {exc}") from exc

    def _body(self, records: Sequence[Record], actions: Sequence[ActionRecord] = ()) -> bytes:
        """The IngestBatch as JSON, assembled from the stored records' JSON without parsing them again."""
        events = ",".join(r.body for r in records if r.kind == "event")
        summaries = ",".join(r.body for r in records if r.kind == "summary")
        status = self._gateway_status()
        self._sending_applied = status.applied
        head = {
            "gateway_id": self._gateway_id,
            "batch_id": str(uuid.uuid4()),
            "sent_at": datetime.now(UTC).isoformat(),
            "agent_version": self._agent_version,
            "gateway": status.model_dump(mode="json", exclude_none=True),
        }
        sent = f', "actions": [{",".join(a.body for a in actions)}]' if actions else ""  # the key only with actions
        return (json.dumps(head)[:-1] + f', "events": [{events}], "summaries": [{summaries}]{sent}}}').encode()


def _check_answer(response: requests.Response, records: Sequence[Record]) -> IngestResult:
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
    return result


def _about_actions(response: requests.Response) -> bool:
    """A 422 that points at the batch's actions (a central older than them: `actions` is an unknown key)."""
    try:
        details = response.json()["error"]["details"]
        return any(isinstance(d, dict) and (d.get("loc") or [None])[0] == "actions" for d in details)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return False


def _check_desired(response: requests.Response) -> DesiredState:
    """A 200 is central's desired state only when it reads as one (a captive portal's page is not: transient)."""
    try:
        return DesiredState.model_validate_json(response.content)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise _Transient(f"central answered 200 with something that is not its desired state ({where}: "
                         f"{first['msg']}): {_reason(response)}") from None


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
