"""Prometheus metrics of a running server, read at scrape time (`--metrics-port`).

Counting must cost nothing measurable on the path of a message, so almost everything here is
read when Prometheus asks, from what the server keeps anyway: its connections (by door), the
chat's users and rooms, the store's commit counts, the loop's pass count, the bytes the writer
sent. The few counters kept for metrics are bumped where something happens once per request
(the chat's `handle`, `register` and `disconnect`, wrapped when metrics are on: requests by
type, and deliveries counted per event as its number of recipients, never per recipient),
once per pass (its duration), once per history commit (its latency), or once per connection
(refusals at the door, disconnections by reason).

The registry is prometheus_client's own `CollectorRegistry` with this module's collector and
the process collector (CPU, memory, descriptors); `generate_latest` writes the text format.
The HTTP side is `selchat.ops.httpd`, in the server's own loop (prometheus_client's server
would start a thread, which this server does not have).
"""

from __future__ import annotations

import bisect
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)

from selchat import __version__
from selchat.core.requests import Say

ORDER_MEASURE = 99  # a before-sleep hook after the writer (90): the pass's work is done

# Seconds. A pass is usually well under a millisecond; the soak's bad seconds were 10-40 ms.
PASS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# One commit of a pass's messages (SQLite WAL, synchronous=NORMAL).
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0)

# Why connections end, as a few fixed words (a label must not take a peer's own words).
_REASONS: Sequence[Tuple[str, str]] = (
    ("slow consumer", "slow_consumer"), ("ping timeout", "ping_timeout"),
    ("excess flood", "excess_flood"), ("quit", "quit"), ("peer closed", "peer_closed"),
    ("closed", "peer_closed"), ("read failed", "reset"), ("write failed", "reset"),
    ("server shutting down", "shutdown"), ("server stopped", "shutdown"),
    ("handshake", "handshake"), ("TLS", "tls"), ("protocol error", "protocol_error"),
    ("bad password", "bad_password"), ("internal error", "internal_error"),
    ("server_full", "refused"), ("too_many_connections", "refused"),
)


def close_reason(detail: str) -> str:
    """A transport's close detail as one of a few label values."""
    for prefix, reason in _REASONS:
        if detail.startswith(prefix):
            return reason
    return "other"


class Histogram:
    """Bucket counts, a sum and a count: what `observe` costs is a bisect and three adds."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets: List[Tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            buckets.append((_float_text(bound), running))
        buckets.append(("+Inf", self.count))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


def _float_text(value: float) -> str:
    return repr(float(value))


_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")
_REQUEST_NAMES = {"JoinRoom": "join", "PartRoom": "part", "ChangeNick": "nick", "ListRooms": "rooms",
                  "HistoryRequest": "history", "Say": "say", "Msg": "msg"}


def request_name(kind: type) -> str:
    """A request class as the protocol's word for it (JoinRoom -> join), for a label."""
    name = kind.__name__
    return _REQUEST_NAMES.get(name) or _SNAKE.sub("_", name).lower()


class ServerMetrics:
    """The server's metrics: counters kept cheaply, and a collector that reads the rest."""

    def __init__(self, server: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        self.server = server
        self.clock = clock
        self.requests: Dict[type, int] = {}
        self.refused_requests: Dict[type, int] = {}
        self._totals = [0]  # deliveries counted by the chat's handle (a list: the closure adds to it)
        self.deliveries = 0  # and those of registrations and departures
        self.registrations = 0
        self.admission_refusals: Dict[str, int] = {}
        self.disconnects: Dict[str, int] = {}
        self.pass_seconds = Histogram(PASS_BUCKETS)
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        self._installed = False

    # --- what the server tells us ---------------------------------------------------------------

    def refused(self, reason: str) -> None:
        """A connection refused at the door (admission): once per connection."""
        self.admission_refusals[reason] = self.admission_refusals.get(reason, 0) + 1

    def closed(self, detail: str) -> None:
        """A client connection ended: once per connection."""
        reason = close_reason(detail)
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    # --- counting at once-per-request and once-per-pass points -----------------------------------

    def install(self) -> None:
        """Count requests and deliveries at the chat's entry points, time passes and commits."""
        if self._installed:
            return
        self._installed = True
        server = self.server
        chat = server.chat
        requests, refused = self.requests, self.refused_requests
        handle, register, disconnect = chat.handle, chat.register, chat.disconnect
        say_message = chat.say_message

        totals = self._totals

        def counted_say(user: Any, *args: Any, **kwargs: Any) -> Any:
            # A room message, however it came (the hub calls this directly for a member): its
            # deliveries are the room's other members and the sender's own copy.
            try:
                room, message = say_message(user, *args, **kwargs)
            except Exception:
                refused[Say] = refused.get(Say, 0) + 1
                raise
            requests[Say] = requests.get(Say, 0) + 1
            totals[0] += len(room.members)
            return room, message

        def counted_handle(user: Any, request: Any, now_ms: int) -> Any:
            # Once per request: a dict update and a len() per event, never a walk over users.
            if type(request) is Say:
                return handle(user, request, now_ms)  # (counted by `counted_say`)
            try:
                deliveries = handle(user, request, now_ms)
            except Exception:
                kind = type(request)
                refused[kind] = refused.get(kind, 0) + 1
                raise
            kind = type(request)
            if kind in requests:
                requests[kind] += 1
            else:
                requests[kind] = 1
            count = 0
            for delivery in deliveries:
                count += len(delivery.recipients) - (delivery.skip is not None)
            totals[0] += count
            return deliveries

        def counted_register(*args: Any, **kwargs: Any) -> Any:
            user, deliveries = register(*args, **kwargs)
            self.registrations += 1
            self.deliveries += _recipients(deliveries)
            return user, deliveries

        def counted_disconnect(*args: Any, **kwargs: Any) -> Any:
            deliveries = disconnect(*args, **kwargs)
            self.deliveries += _recipients(deliveries)
            return deliveries

        chat.handle = counted_handle
        chat.say_message = counted_say
        chat.register = counted_register
        chat.disconnect = counted_disconnect

        store = server.store
        commit = getattr(store, "commit", None)
        if commit is not None:
            clock, histogram = self.clock, self.commit_seconds

            def timed_commit(*args: Any, **kwargs: Any) -> Any:
                start = clock()
                stored = commit(*args, **kwargs)
                if stored:
                    histogram.observe(clock() - start)
                return stored

            try:
                store.commit = timed_commit
            except AttributeError:  # a store with slots: its commits go untimed
                pass

        reactor = server.reactor
        pass_clock = reactor.clock
        passes = self.pass_seconds

        def measure_pass() -> None:
            passes.observe(pass_clock() - reactor.now)

        reactor.add_before_sleep(measure_pass, ORDER_MEASURE)

    # --- health ---------------------------------------------------------------------------------

    def health(self) -> Tuple[bool, str]:
        """200 while the server serves (and its Redis link, if any, is up); 503 otherwise."""
        server = self.server
        if getattr(server, "_stopping", False):
            return False, "stopping"
        link = getattr(server, "redis", None)
        if link is not None and not link_up(link):
            return False, "redis link down"
        cluster = getattr(server, "cluster", None)
        if cluster is not None and not cluster.live:
            return False, "not in the cluster yet (starting, or catching up)"
        return True, "ok"

    # --- the collector --------------------------------------------------------------------------

    def describe(self) -> List[Any]:
        return []  # (names are not checked at registration: the families come at scrape time)

    def collect(self) -> Iterator[Any]:
        server = self.server
        info = InfoMetricFamily("selchat_build", "The server's version.")
        info.add_metric([], {"version": __version__})
        yield info

        by_door: Dict[str, int] = {"native": 0, "irc": 0, "web": 0}
        registered: Dict[str, int] = {"native": 0, "irc": 0, "web": 0}
        for transport in list(server.transports.values()):
            session = transport.session
            door = _door_of(session)
            by_door[door] = by_door.get(door, 0) + 1
            if getattr(session, "user", None) is not None:
                registered[door] = registered.get(door, 0) + 1
        connections = GaugeMetricFamily("selchat_connections", "Open client connections, by door.",
                                        labels=["door"])
        for door, count in sorted(by_door.items()):
            connections.add_metric([door], count)
        yield connections
        sessions = GaugeMetricFamily("selchat_registered_connections",
                                     "Connections past registration, by door.", labels=["door"])
        for door, count in sorted(registered.items()):
            sessions.add_metric([door], count)
        yield sessions
        yield GaugeMetricFamily("selchat_proxy_pending_connections",
                                "Connections from trusted proxies whose PROXY header is awaited.",
                                value=len(getattr(server, "gates", ())))
        chat = server.chat
        yield GaugeMetricFamily("selchat_users", "Registered users.", value=len(chat.users))
        yield GaugeMetricFamily("selchat_rooms", "Rooms that exist.", value=len(chat.rooms))
        yield CounterMetricFamily("selchat_accepted_connections", "Connections accepted, every door.",
                                  value=server.accepted)
        yield CounterMetricFamily("selchat_registrations", "Users registered (hello, NICK/USER).",
                                  value=self.registrations)

        requests = CounterMetricFamily("selchat_requests", "Chat requests carried out, by type.",
                                       labels=["type"])
        for kind, count in sorted(self.requests.items(), key=lambda item: item[0].__name__):
            requests.add_metric([request_name(kind)], count)
        yield requests
        refused = CounterMetricFamily("selchat_requests_refused",
                                      "Chat requests refused by the chat's rules, by type.",
                                      labels=["type"])
        for kind, count in sorted(self.refused_requests.items(), key=lambda item: item[0].__name__):
            refused.add_metric([request_name(kind)], count)
        yield refused
        messages = CounterMetricFamily("selchat_messages", "Messages said, to rooms and in private.",
                                       labels=["kind"])
        by_name = {request_name(kind): count for kind, count in self.requests.items()}
        messages.add_metric(["room"], by_name.get("say", 0))
        messages.add_metric(["private"], by_name.get("msg", 0))
        yield messages
        yield CounterMetricFamily("selchat_deliveries",
                                  "Events delivered, one per recipient user (each connection of "
                                  "a user on several gets its copy too).",
                                  value=self.deliveries + self._totals[0])
        yield CounterMetricFamily("selchat_sent_bytes", "Bytes written to client connections.",
                                  value=getattr(server.writer, "sent", 0))

        drops = CounterMetricFamily("selchat_slow_consumer_drops",
                                    "Clients dropped for not reading (--max-outbuf).",
                                    value=self.disconnects.get("slow_consumer", 0))
        yield drops
        floods = CounterMetricFamily("selchat_flood_refusals",
                                     "Refusals for flooding, by kind: connections refused at the door "
                                     "(server_full, too_many_connections), requests refused by flood "
                                     "control (rate_limited) and clients disconnected for flooding "
                                     "(excess_flood).", labels=["kind"])
        for reason in ("server_full", "too_many_connections"):
            floods.add_metric([reason], self.admission_refusals.get(reason, 0))
        floods.add_metric(["rate_limited"], sum(getattr(door, "rate_limited", 0)
                                                for door in (server.framed, server.web) if door is not None))
        floods.add_metric(["excess_flood"], self.disconnects.get("excess_flood", 0))
        yield floods
        ends = CounterMetricFamily("selchat_disconnects", "Client connections ended, by reason.",
                                   labels=["reason"])
        for reason, count in sorted(self.disconnects.items()):
            ends.add_metric([reason], count)
        yield ends

        stats = _store_stats(server.store)
        yield CounterMetricFamily("selchat_history_commits", "History commits (one per pass with messages).",
                                  value=stats.get("commits", 0))
        yield CounterMetricFamily("selchat_history_messages_stored", "Messages written to history.",
                                  value=stats.get("messages", 0))
        yield CounterMetricFamily("selchat_history_write_failures", "History commits that failed.",
                                  value=stats.get("failures", 0))
        yield self.commit_seconds.family("selchat_history_write_seconds",
                                         "Time one history commit took.")
        yield CounterMetricFamily("selchat_history_checkpoints",
                                  "WAL checkpoints of the history file (run after a pass's writes).",
                                  value=stats.get("checkpoints", 0))
        yield CounterMetricFamily("selchat_history_checkpoint_failures",
                                  "WAL checkpoints that failed (tried again the next pass).",
                                  value=stats.get("checkpoint_failures", 0))
        yield CounterMetricFamily("selchat_history_checkpoint_seconds",
                                  "Time spent in WAL checkpoints.",
                                  value=stats.get("checkpoint_seconds", 0.0))
        yield CounterMetricFamily("selchat_loop_passes", "Passes of the event loop.",
                                  value=server.reactor.passes)
        yield self.pass_seconds.family("selchat_loop_pass_seconds",
                                       "Work time of one loop pass (from select's return to sleep).")

        link = getattr(server, "redis", None)
        if link is not None:
            yield GaugeMetricFamily("selchat_redis_link_up", "1 while the Redis link is up.",
                                    value=1 if link_up(link) else 0)
            lag = getattr(link, "lag", None)
            if lag is not None:
                yield GaugeMetricFamily("selchat_redis_lag_seconds",
                                        "How far behind the Redis stream this server is.", value=float(lag))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


def link_up(link: Any) -> bool:
    """Whether a Redis link (selchat.links.redis.RedisLink, at `server.redis`) is up: its
    `up`, or its `state` being UP."""
    up = getattr(link, "up", None)
    if up is None:
        state = getattr(link, "state", None)
        up = getattr(state, "value", state) == "up"
    return bool(up)


def _recipients(deliveries: Any) -> int:
    """Recipient users of a list of deliveries: a len() per event, never a walk over users."""
    count = 0
    for delivery in deliveries:
        try:
            count += len(delivery.recipients) - (delivery.skip is not None)
        except TypeError:
            count += 1
    return count


def _door_of(session: Any) -> str:
    module = type(session).__module__
    if ".irc" in module:
        return "irc"
    if ".web" in module:
        return "web"
    return "native"


def _store_stats(store: Any) -> Dict[str, float]:
    stats = getattr(store, "stats", None)
    if stats is None:
        return {}
    try:
        return dict(stats())
    except Exception:  # a store that cannot say (closed): nothing rather than a failed scrape
        return {}


__all__ = ["ServerMetrics", "Histogram", "close_reason", "request_name"]
