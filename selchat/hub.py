"""The hub: the one owner of the chat state and the store, which every door talks to.

Doors turn their wire into requests and call `register`, `handle` and `leave`; the hub runs
them against the chat state and hands the deliveries to the fan-out. It also keeps the loop's
promises that belong to the chat rather than to bytes:

* no teardown in the middle of a broadcast: a session that must go (a slow consumer) is
  *condemned*, and removed between requests, when the chat state is consistent;
* nothing is sent before it is stored: the pass's messages are committed in one transaction
  by a before-sleep hook that runs before the writer's (see `selchat.loop.reactor`);
* a message that was delivered but could not be stored is reported to its sender.

While the disk refuses writes, every pass fails its commit; the log gets that once per period
with a count (`selchat.loop.ratelog`), not once per pass.
"""

from __future__ import annotations

import fnmatch
import heapq
import logging
import secrets
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from selchat.core.chat import Chat, ChatError, Room, User, said
from selchat.core.events import Message
from selchat.core.names import fold
from selchat.core.passwords import ScramCredentials, password_problem, scram_credentials
from selchat.core.requests import (ChangePassword, HistoryRequest, Kill, ListRooms, Login, Logout,
                                   Register, Request, Say, SetModes, Who)
from selchat.core.store import pair_key
from selchat.defaults import REQUESTS_PER_PASS
from selchat.fanout import Fanout
from selchat.loop import ratelog
from selchat.loop.pacing import Pacer
from selchat.loop.reactor import (ORDER_AFTER_WRITE, ORDER_COMMIT, ORDER_DELIVER, ORDER_SETTLE,
                                  Reactor)

log = logging.getLogger("selchat.server")

EXPENSIVE_PER_PASS = 0.002  # CPU seconds of deferred expensive answers one loop pass may serve

__all__ = ["Hub", "ChatError"]

_ACCOUNT_REQUESTS = (Register, Login, Logout, ChangePassword)
_READS = (Who, ListRooms, HistoryRequest)  # answered from this process's copy, never ordered


class _Job:
    """A request whose answer may come later: if it finished at once, the door goes on as
    after any request; else the door waits for `job_done()`."""

    __slots__ = ("session", "waiting", "done")

    def __init__(self, session: Any) -> None:
        self.session = session
        self.waiting = False
        self.done = False

    def finished(self) -> None:
        self.done = True
        if self.waiting:
            self.session.job_done()

    def pending(self) -> bool:
        self.waiting = not self.done
        return self.waiting


def cluster_request(request: Request) -> List[Any]:
    from selchat.links.cluster import encode_request  # only with --redis
    return encode_request(request)


def _raise(code: str, message: str) -> Callable[[], List[Any]]:
    def fail() -> List[Any]:
        raise ChatError(code, message)
    return fail


class Hub:
    __slots__ = ("chat", "store", "reactor", "fanout", "wall_ms", "_condemned", "_said",
                 "_drop_queued", "commits", "ratelog", "pacer", "_expensive_pass",
                 "_expensive_spent", "_served_pass", "_served", "_held", "kdf", "cluster")

    def __init__(self, chat: Chat, reactor: Reactor,
                 wall_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.chat = chat
        self.store = chat.store
        self.reactor = reactor
        self.fanout = Fanout()
        self.wall_ms = wall_ms
        self._condemned: List[Tuple[Any, str]] = []
        self._said: List[Tuple[Any, Any, int]] = []  # (session, ref, id) of the pass's messages
        self._drop_queued = False
        self.commits = 0
        self.ratelog = ratelog.shared(log)
        self.ratelog.attach(reactor.call_later, lambda: reactor.now)
        # Registrations per address, paced (selchat.loop.pacing); None: every door registers
        # at once. Set by whoever assembles the server.
        self.pacer: Optional[Pacer] = None
        # Sessions holding an expensive request for a later pass, oldest first: they are served
        # in this order, and a fresh expensive request waits behind them (no one starves).
        self._held: Dict[Any, None] = {}
        self._served_pass = -1  # the pass `_served` counts requests of
        self._served = 0
        self._expensive_pass = -1  # the pass `_expensive_spent` counts for
        self._expensive_spent = 0.0  # CPU seconds of expensive answers served in that pass
        # Password hashing and checking, off the loop (selchat.kdf); set by whoever assembles
        # the server. None: accounts cannot be used (`unavailable`).
        self.kdf: Any = None
        # With --redis (selchat.links.cluster.ClusterNode): every change is ordered by Redis
        # and applied from that order, here as on every other process. None: alone.
        self.cluster: Any = None
        chat.before_change = self.fanout.flush
        reactor.add_before_sleep(self._settle, ORDER_SETTLE)
        reactor.add_before_sleep(self._commit, ORDER_COMMIT)
        reactor.add_before_sleep(self._send_batch, ORDER_DELIVER)
        if hasattr(self.store, "checkpoint_due"):
            reactor.add_before_sleep(self._checkpoint, ORDER_AFTER_WRITE)

    # --- for doors ----------------------------------------------------------------------------

    def register(self, nick: str, session: Any, ref: Any = None, **details: Any) -> User:
        """Register `session` as `nick`; raises ChatError (nick_taken, nick_reserved) when it
        cannot be. `account=` (from `authenticate`) logs it in; if that account is online
        already, the session becomes one more connection of that user."""
        user, deliveries = self.chat.register(nick, session, now_ms=self.wall_ms(), **details)
        self._deliver(deliveries, ref, session)
        return user

    def admit(self, nick: str, session: Any, ref: Any,
              done: Callable[[Optional[User], Optional[ChatError]], None], **details: Any) -> bool:
        """`register`, for a door that can wait: `done(user, None)` or `done(None, error)`, at
        once when alone, once ordered with the cluster (then True: the answer comes later)."""
        cluster = self.cluster
        if cluster is None:
            try:
                user = self.register(nick, session, ref, **details)
            except ChatError as exc:
                done(None, exc)
                return False
            done(user, None)
            return False
        sid = cluster.sid(session)
        account = details.get("account")
        body = {"k": "reg", "s": sid, "nick": nick, "lobby": details.get("join_lobby", True),
                "ident": details.get("ident", ""), "host": details.get("host", "selchat"),
                "real": details.get("realname", ""), "door": details.get("door", ""),
                # a holder key every process agrees on (a User draws its own otherwise)
                "origin": details.get("origin") or f"\0{sid}", "t": self.wall_ms(),
                "acct": account,
                "tok": secrets.token_urlsafe(32) if account and details.get("remember") else None}
        cluster.submit(body, session, ref, then=lambda user: done(user, None),
                       refused=lambda exc: done(None, exc))
        return True

    def _deliver(self, deliveries: List[Any], ref: Any, session: Any) -> None:
        fanout = self.fanout
        fanout.current = session
        try:
            fanout.deliver(deliveries, ref)
        finally:
            fanout.current = None

    def handle(self, user: User, request: Request, ref: Any = None, session: Any = None,
               refused: Optional[Callable[[ChatError], None]] = None) -> bool:
        """Carry out a request; raises ChatError for the door to put in its own words.

        `session` is the connection that asked (its answer carries `ref`; the user's other
        connections see their own copies); doors pass it. True when the answer comes later
        (a password is being checked off the loop; with the cluster, a change waits for its
        order): the door then serves nothing more of this connection until the hub calls its
        `job_done()`. An error found then goes to `refused(error)` (None: the session's
        `send_error` with `ref`).
        """
        if session is None:
            session = user.session
        kind = type(request)
        if kind in _ACCOUNT_REQUESTS:
            return self._account_request(user, request, ref, session)
        cluster = self.cluster
        if cluster is not None and kind not in _READS and not (
                kind is SetModes and not request.changes):  # type: ignore[union-attr]  # (a query)
            sid = cluster.sid(session)
            if kind is Kill:
                body = {"k": "kill", "s": sid, "nick": request.nick,  # type: ignore[union-attr]
                        "why": request.reason}  # type: ignore[union-attr]
            else:
                body = {"k": "req", "s": sid, "r": cluster_request(request), "t": self.wall_ms()}
            cluster.submit(body, session, ref, refused=refused, job=True)
            return True
        if kind is Say:
            self._say(user, session, ref, request.room, request.text, request.action,  # type: ignore[union-attr]
                      request.notice, request.client_tags)  # type: ignore[union-attr]
            return False
        if kind is Kill:
            self._kill(user, request, ref, session)  # type: ignore[arg-type]
            return False
        self._deliver(self.chat.handle(user, request, self.wall_ms()), ref, session)
        return False

    def say(self, user: User, session: Any, ref: Any, room: str, text: str, action: bool = False,
            notice: bool = False, client_tags: Tuple[Tuple[str, str], ...] = (),
            refused: Optional[Callable[[ChatError], None]] = None) -> bool:
        """`handle(user, Say(room, text, ...), ref, session, refused)`, for the doors' busiest
        request without making it: the same rule, the same answers, the same return."""
        if self.cluster is not None:
            return self.handle(user, Say(room, text, action, notice, client_tags), ref, session, refused)
        self._say(user, session, ref, room, text, action, notice, client_tags)
        return False

    def _say(self, user: User, session: Any, ref: Any, room_name: str, text: str, action: bool,
             notice: bool, client_tags: Tuple[Tuple[str, str], ...]) -> None:
        room, message = self.chat.say_message(user, room_name, text, self.wall_ms(), action,
                                              notice, client_tags)
        if user in room.members:
            # The busy case, without the generic deliveries: a member's message joins the
            # pass's room batch directly (what `Fanout.deliver` makes of `Chat.say`'s two).
            self.fanout.room_message(room, message, session, ref)
        else:  # (IRC's -n: a sender outside the room is answered apart)
            self._deliver(said(room, message, user), ref, session)
        self._said.append((session, ref, message.id))

    def leave(self, user: User, reason: Optional[str], session: Any = None) -> None:
        """A connection leaves the chat; when it was the user's last one and there is a
        reason, those sharing a room see the user `quit`. Doors pass their session."""
        if self.cluster is not None:
            self.cluster.leave(user, session if session is not None else user.session, reason)
            return
        deliveries = self.chat.disconnect(user, reason or "", session)
        if reason is not None:
            self.fanout.deliver(deliveries, None)

    # --- accounts: the slow password work runs in the KDF's worker, never in the loop --------

    def authenticate(self, account: str, password: Optional[str], token: Optional[str],
                     address: str, done: Callable[[Optional[str], Optional[ChatError]], None]) -> None:
        """Check a login before registering (or for `login` after it): `done(account, None)`
        with the account's name, or `done(None, error)`. A token is checked at once; a
        password in the KDF's worker, so `done` may come in a later pass."""
        chat = self.chat
        now = self.reactor.now
        try:
            key = chat.login_check(account, address, now, token=token is not None)
        except ChatError as exc:
            done(None, exc)
            return
        if token is not None:
            if chat.accounts.exists(key) and chat.accounts.token_matches(key, token):
                done(chat.accounts.name(key), None)
            else:
                done(None, chat.login_failed(key, address, now, token=True))
            return
        if self.kdf is None:
            done(None, ChatError("unavailable", "accounts are not available"))
            return
        if password is None:
            done(None, chat.login_failed(key, address, now))
            return
        # An unknown account is checked against a record no password opens, at the same cost:
        # the time taken does not tell it from a wrong password.
        verifier = chat.accounts.verifier(key)
        # Charged now, given back if the password was right: counted only once answered, a
        # burst of logins sent at once all passed the check above (each minute, a bucket
        # being empty at worst).
        failed = chat.login_failed(key, address, now)

        def checked(ok: Optional[bool]) -> None:
            if ok is None:
                chat.login_refund(key, address, self.reactor.now)
                done(None, ChatError("unavailable", "the password could not be checked: try again"))
            elif ok and chat.accounts.exists(key):
                chat.login_refund(key, address, self.reactor.now)
                done(chat.accounts.name(key), None)
            else:
                done(None, failed)

        if not self.kdf.verify(password, verifier, checked):
            chat.login_refund(key, address, now)
            done(None, ChatError("login_throttled", "too many logins at once: try again in a "
                                 "few seconds"))

    def _account_request(self, user: User, request: Any, ref: Any, session: Any) -> bool:
        chat = self.chat
        kind = type(request)

        job = _Job(session)

        cluster = self.cluster

        def finish(make: Callable[[], List[Any]], change: Optional[Dict[str, Any]] = None) -> None:
            """The job is done: decide (if the user is still there) and answer. With the
            cluster, `change` is ordered and applied everywhere instead of `make`."""
            if cluster is not None and change is not None:
                def failed(exc: ChatError) -> None:
                    session.send_error(exc.code, exc.message, ref)
                    job.finished()

                change.update(k="acct", s=cluster.sid(session), t=self.wall_ms())
                cluster.submit(change, session, ref, then=lambda _: job.finished(), refused=failed)
                return
            if chat.users.get(user.key) is user and session in user.sessions:
                try:
                    self._deliver(make(), ref, session)
                except ChatError as exc:
                    session.send_error(exc.code, exc.message, ref)
            job.finished()

        if kind is Logout:
            if cluster is not None:
                finish(lambda: [], {"op": "logout", "token": request.token})
                return job.pending()
            self._deliver(chat.log_out(user, request.token), ref, session)
            return False
        if self.kdf is None:
            raise ChatError("unavailable", "accounts are not available on this server")
        if kind is Register:
            chat.may_register_account(user)
            problem = password_problem(request.password)
            if problem:
                raise ChatError("bad_password", problem)

            def hashed(verifier: Optional[str]) -> None:
                if verifier is None:
                    finish(_raise("unavailable", "the account could not be made: try again"))
                else:
                    finish(lambda: chat.register_account(user, verifier, self.wall_ms(),
                                                         request.remember),
                           {"op": "register", "v": verifier,
                            "tok": secrets.token_urlsafe(32) if request.remember else None})

            if not self.kdf.hash(request.password, hashed):
                raise ChatError("login_throttled", "too many logins at once: try again soon")
            return job.pending()
        if kind is Login:
            if user.account_key is not None:
                raise ChatError("already_registered", f"you are logged in as {user.account} already")

            def proved(account: Optional[str], error: Optional[ChatError]) -> None:
                if account is None:
                    finish(_raise(error.code, error.message))  # type: ignore[union-attr]
                else:
                    finish(lambda: self._log_in(user, fold(account), session, request.remember),
                           {"op": "login", "a": fold(account),
                            "tok": secrets.token_urlsafe(32) if request.remember else None})

            self.authenticate(request.account, request.password, request.token,
                              getattr(session.transport, "ip", ""), proved)
            return job.pending()
        # ChangePassword: check the old one, then hash the new one.
        if user.account_key is None:
            raise ChatError("not_logged_in", "log in first")
        problem = password_problem(request.new)
        if problem:
            raise ChatError("bad_password", problem)
        key = user.account_key
        verifier = chat.accounts.verifier(key) or ""

        def rehashed(new: Optional[str]) -> None:
            if new is None:
                finish(_raise("unavailable", "the password could not be changed: try again"))
            else:
                finish(lambda: chat.set_password(user, new, self.wall_ms(), request.remember),
                       {"op": "password", "v": new,
                        "tok": secrets.token_urlsafe(32) if request.remember else None})

        def old_checked(ok: Optional[bool]) -> None:
            if ok is not False:  # (charged before the work, as a login is)
                chat.login_refund(key, getattr(session.transport, "ip", ""), self.reactor.now)
            if not ok:
                finish(_raise("login_failed" if ok is False else "unavailable",
                              "the old password is wrong" if ok is False else "try again"))
            elif not self.kdf.hash(request.new, rehashed):
                finish(_raise("login_throttled", "too many logins at once: try again soon"))

        wait = chat.accounts.throttle.wait(key, getattr(session.transport, "ip", ""), self.reactor.now)
        if wait > 0:
            raise ChatError("login_throttled", f"too many failed tries: wait {int(wait) + 1} s")
        chat.login_failed(key, getattr(session.transport, "ip", ""), self.reactor.now)
        if not self.kdf.verify(request.old, verifier, old_checked):
            chat.login_refund(key, getattr(session.transport, "ip", ""), self.reactor.now)
            raise ChatError("login_throttled", "too many logins at once: try again soon")
        return job.pending()

    def _log_in(self, user: User, key: str, session: Any, remember: bool) -> List[Any]:
        """`login` after welcome. Into an account online elsewhere, the connection leaves its
        guest self and becomes one more of the account's user: its door's session says so."""
        out = self.chat.log_in(user, key, session, self.wall_ms(), remember)
        owner = self.chat.online.get(key)
        if owner is not None and owner is not user and session in owner.sessions:
            session.user = owner
        return out

    def _kill(self, user: User, request: Kill, ref: Any, session: Any) -> None:
        target = self.chat.kill_target(user, request.nick)
        reason = f"killed by {user.nick}" + (f": {request.reason}" if request.reason else "")
        log.info("kill: %s kills %s (%s)", user.nick, target.nick, request.reason)
        for victim in list(target.sessions):
            self.condemn(victim, reason)

    def take_request(self) -> bool:
        """May a session serve one more request in this pass? A pass serves REQUESTS_PER_PASS
        in all: however many connections have much to ask at once (a stall's backlog, a
        hundred clients sending their bursts), the pass stays short, and whoever was not
        served goes on in the next one, so a bystander's message waits a short pass, not a
        long one."""
        passes = self.reactor.passes
        if self._served_pass != passes:
            self._served_pass, self._served = passes, 0
        self._served += 1
        return self._served <= REQUESTS_PER_PASS

    def spent_expensive(self, seconds: float) -> None:
        """An expensive answer (rooms, history, who, join) took `seconds` of this pass."""
        passes = self.reactor.passes
        if self._expensive_pass != passes:
            self._expensive_pass, self._expensive_spent = passes, 0.0
        self._expensive_spent += seconds

    def expensive_room(self, session: Any) -> bool:
        """May `session` have an expensive answer served now? One pass serves at most
        EXPENSIVE_PER_PASS seconds of them, so a pass stays short however many fall due; and
        those held over from earlier passes go first, oldest first, so fresh ones arriving
        every pass cannot push them back for ever."""
        held = self._held
        if held and next(iter(held)) is not session:
            return False
        return self._expensive_pass != self.reactor.passes or self._expensive_spent < EXPENSIVE_PER_PASS

    def hold(self, session: Any) -> None:
        """`session` keeps an expensive request for a later pass: it queues for its turn."""
        self._held[session] = None

    def unhold(self, session: Any) -> None:
        """`session`'s held request was served, or the session is gone."""
        self._held.pop(session, None)

    def log_refusal(self, peer: str, reason: str) -> None:
        """One line per reason and period, with a count (an attacker must not fill the log)."""
        self.ratelog.log(logging.WARNING, ("refusing", reason), "refusing %s: %s", peer, reason)

    def condemn(self, session: Any, reason: str) -> None:
        """Remove `session` between requests, never in the middle of a broadcast."""
        self._condemned.append((session, reason))
        if not self._drop_queued:
            self._drop_queued = True
            self.reactor.call_soon(self._drop_condemned)

    # --- before sleep -------------------------------------------------------------------------

    def _drop_condemned(self) -> None:
        self._drop_queued = False
        self.fanout.flush()
        while self._condemned:
            condemned, self._condemned = self._condemned, []
            for session, reason in condemned:
                session.drop(reason)
            self.fanout.flush()

    def _settle(self) -> None:
        if self._condemned:
            self._drop_condemned()

    def _commit(self) -> None:
        said, self._said = self._said, []
        try:
            stored = self.store.commit()
        except Exception as exc:  # StoreError, or anything else the disk throws at us
            # Keep serving: the messages go out (queued by the first error's flush of the
            # batch, ahead of it), but their senders learn that history will not have them.
            self.ratelog.log(logging.ERROR, "history write failed",
                             "history write failed, %d message(s) not stored: %s", len(said), exc)
            for session, ref, message_id in said:  # (each error flushes the batch before it)
                session.send_error("not_stored", f"message {message_id} was delivered "
                                   "but could not be stored in history", ref)
            return
        if stored:
            self.commits += 1

    def _send_batch(self) -> None:
        """The pass's batched room messages out, once they are durable: sent at once to a
        member with nothing queued (one visit per member instead of the queue's and the
        writer's), queued behind what waits for any other."""
        self.fanout.flush(now=True)

    def _checkpoint(self) -> None:
        """The store's upkeep, after the pass's bytes are out: no message waits for it."""
        store = self.store
        if store.checkpoint_due():
            try:
                store.checkpoint()
            except Exception as exc:  # StoreError: the disk; the next pass tries again
                self.ratelog.log(logging.ERROR, "history checkpoint failed",
                                 "history checkpoint failed: %s", exc)

    # --- queries for doors ----------------------------------------------------------------------
    # What a door may read of the chat state, so that it speaks to the hub and nothing below it
    # (the IRC door's WHO, WHOIS, NAMES, LIST, CHATHISTORY...). The records returned are the
    # chat's own: a door reads them and never changes them. Two changes that are no request of
    # the chat's (AWAY, a CHATHISTORY window) come through here too.

    def find_user(self, nick: str) -> Optional[User]:
        return self.chat.users.get(fold(nick))

    def find_room(self, name: str) -> Optional[Room]:
        return self.chat.rooms.get(fold(name))

    def may_see(self, user: Optional[User], room: Room) -> bool:
        """False for a secret room `user` is not in: to it, the room does not exist."""
        return self.chat.may_see(user, room)

    def is_member(self, user: User, room_name: str) -> bool:
        return fold(room_name) in user.rooms

    def users_matching(self, mask: str, limit: int) -> List[User]:
        """The first `limit` users, in nick order, whose nick matches the glob `mask` (`*`,
        `?`; any case). Its cost grows with the server: the asker bills it (IRC's WHO)."""
        pattern = fold(mask)
        found = [u for u in self.chat.users.values() if fnmatch.fnmatchcase(u.key, pattern)]
        return heapq.nsmallest(limit, found, key=lambda u: u.key)

    def user_count(self) -> int:
        return len(self.chat.users)

    def formed_room_count(self) -> int:
        """Rooms with members (the lobby counts only while someone is in it)."""
        return sum(1 for room in self.chat.rooms.values() if room.members)

    def rooms_by_name(self, after: str = "", count: int = 100) -> List[Room]:
        """Up to `count` rooms whose key comes after `after`, in key order (IRC's LIST)."""
        return self.chat.rooms_by_name(after, count)

    @property
    def motd(self) -> str:
        return self.chat.motd

    def set_away(self, user: User, text: Optional[str], session: Any = None) -> bool:
        """Mark `user` away with `text`, or back (None). True: with the cluster, it is applied
        once ordered, and the door serves nothing more of `session` until `job_done()`."""
        if self.cluster is not None:
            return self._set_attribute(user, "away", text, session)
        self.chat.set_away(user, text)
        return False

    def _set_attribute(self, user: User, name: str, value: Any, session: Any) -> bool:
        """Raises ChatError `unavailable` when the cluster cannot take it now (the door says
        so); refused later (the link fell as it went), it is logged."""
        cluster = self.cluster
        if not cluster.live:
            raise ChatError("unavailable", "the cluster link is down: try again")
        session = session if session is not None else user.session
        cluster.submit({"k": "attr", "s": cluster.sid(session), "a": name, "v": value}, session,
                       refused=lambda exc: log.warning("%s of %s not applied: %s", name, user.nick,
                                                       exc.message), job=True)
        return True

    def history_window(self, user: User, target: str, *, limit: int, latest: bool,
                       **bounds: int) -> List[Message]:
        """Messages of a room `user` is in, or of its private conversation with the account
        `target` names (both logged in), strictly between the bounds given (`after`, `before`,
        `after_ts`, `before_ts`), oldest first: the `limit` newest (`latest`) or oldest.
        Raises ChatError not_in_room, not_logged_in, no_such_nick or history_unavailable."""
        if target.startswith("#"):
            room = user.rooms.get(fold(target))
            if room is None:
                raise ChatError("not_in_room", f"you are not in {target}")
            where = room.name
        else:
            if user.account_key is None:
                raise ChatError("not_logged_in", "private history is kept for accounts only")
            partner = self.chat.partner_account(target)
            if partner is None:
                raise ChatError("no_such_nick", "not an account")
            where = pair_key(user.account_key, partner)
        try:
            return self.store.window(where, limit=limit, latest=latest, **bounds)
        except Exception as exc:  # StoreError, or anything else the disk throws at us
            log.error("history read failed: %s", exc)
            raise ChatError("history_unavailable", "history cannot be read right now") from None

    def history_targets(self, user: User, after_ts: int, before_ts: int, limit: int,
                        from_start: bool = True) -> List[Tuple[str, int]]:
        """(name, time of the newest message) of every room `user` is in and every account it
        has a kept conversation with, with a message strictly between the two times, oldest
        first: the first `limit` of them counted from `after_ts` (`from_start`) or from
        `before_ts` (IRC's CHATHISTORY TARGETS, counted from the first time given). Costs one
        short read per room and conversation: the door bills it."""
        wanted: List[Tuple[str, str]] = [(room.name, room.name) for room in user.rooms.values()]
        if user.account_key is not None:
            accounts = self.chat.accounts
            for partner in sorted(self.chat.directory.partners.get(user.account_key, ())):
                wanted.append((accounts.name(partner) or partner,
                               pair_key(user.account_key, partner)))
        found: List[Tuple[str, int]] = []
        try:
            for name, where in wanted:
                newest = self.store.window(where, after_ts=after_ts, before_ts=before_ts,
                                           limit=1, latest=True)
                if newest:
                    found.append((name, newest[-1].ts))
        except Exception as exc:  # StoreError, or anything else the disk throws at us
            log.error("history read failed: %s", exc)
            raise ChatError("history_unavailable", "history cannot be read right now") from None
        found.sort(key=lambda item: item[1])
        if limit <= 0:
            return []
        return found[:limit] if from_start else found[-limit:]

    def scram_credentials(self, account: str, address: str) -> Optional[ScramCredentials]:
        """The SCRAM-SHA-256 credentials stored for `account` (None: no such account, or one
        that logs in with PLAIN only); raises ChatError login_throttled, as a login would."""
        key = self.chat.login_check(account, address, self.reactor.now)
        verifier = self.chat.accounts.verifier(key)
        return scram_credentials(verifier) if verifier is not None else None

    def login_failed(self, account: str, address: str) -> None:
        """A proof for `account` failed outside the hub (a SCRAM exchange): it counts."""
        self.chat.login_failed(fold(account), address, self.reactor.now)

    def account_name(self, account: str) -> Optional[str]:
        """How the account `account` (any case) is spelt, or None when there is none."""
        return self.chat.accounts.name(fold(account))

    def is_server_operator(self, user: User) -> bool:
        return self.chat.accounts.is_operator(user.account_key)

    def operator_count(self) -> int:
        """Server operators online (IRC's LUSERS)."""
        is_operator = self.chat.accounts.is_operator
        return sum(1 for key in self.chat.online if is_operator(key))

    def whowas(self, nick: str, count: int = 0) -> List[Tuple[str, str, str, str]]:
        """(nick, ident, host, realname) of those who had `nick`, newest first (IRC's WHOWAS)."""
        return self.chat.was(nick, count)

    def watch_presence(self, callback: Callable[[str, Optional[User]], None]) -> None:
        """`callback(nick, user)` when a nick comes online, `(nick, None)` when it goes (IRC's
        MONITOR); one watcher, the IRC door's."""
        self.chat.presence = callback

    def room_mates(self, user: User) -> List[User]:
        """Those who share a room with `user`, itself left out (rooms past the presence
        bound left out too, as for joins and quits)."""
        mates: Dict[User, None] = {}
        limit = self.chat.max_presence
        for room in user.rooms.values():
            if len(room.members) <= limit:
                mates.update(room.members)
        mates.pop(user, None)
        return list(mates)

    def connection_modes(self, session: Any, **modes: bool) -> None:
        """IRC's +i and +B, kept by the connection: with the cluster, other processes' copy of
        it learns them too (their WHO masks and bot tags read them); best effort."""
        cluster = self.cluster
        if cluster is not None and cluster.live:
            cluster.submit({"k": "attr", "s": cluster.sid(session), "a": "modes", "v": modes},
                           refused=lambda exc: None)

    def set_realname(self, user: User, text: str, session: Any = None) -> bool:
        """IRC's SETNAME: the real name WHO and WHOIS show. True: as for `set_away`."""
        if self.cluster is not None:
            return self._set_attribute(user, "realname", text, session)
        user.realname = text
        return False

    def invitations(self, user: User) -> List[str]:
        """The rooms `user` is invited to and not in, by name (IRC's INVITE with no
        argument). It looks at every room: a rare question, answered in one pass."""
        return sorted(room.name for room in self.chat.rooms.values()
                      if room.invited and user in room.invited and user not in room.members)
