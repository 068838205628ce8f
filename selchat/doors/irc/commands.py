"""The IRC door's command table, checked in one place (as Ergo's `commands.go`).

Each command names its handler, whether it may be used before registration, and how many
parameters it needs at least; `run` answers the generic refusals from the table (451 before
registration, 462 for registration commands after it, 461 for too few parameters, 421 for an
unknown command), so the handlers only parse and ask the hub. Commands whose missing
parameter has a numeric of its own (NICK's 431, PRIVMSG's 411, PING's 409, CHATHISTORY's FAIL)
have `min_params` 0 and say it themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict

from selchat.doors.irc import (accounts, channels, history, markread, messaging, monitor, queries,
                               registration)
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.parser import Line

if TYPE_CHECKING:
    from selchat.doors.irc.session import IrcSession

Handler = Callable[["IrcSession", Line], None]


@dataclass(frozen=True)
class Command:
    handler: Handler
    before_registration: bool = False  # usable before registration (and after it too)
    only_before: bool = False  # registration itself (PASS, USER): 462 once registered
    min_params: int = 0


COMMANDS: Dict[str, Command] = {
    # registration (selchat.doors.irc.registration)
    "CAP": Command(registration.cap, before_registration=True, min_params=1),
    "PASS": Command(registration.pass_, before_registration=True, only_before=True, min_params=1),
    "NICK": Command(registration.nick, before_registration=True),
    "USER": Command(registration.user, before_registration=True, only_before=True, min_params=4),
    "AUTHENTICATE": Command(accounts.authenticate, before_registration=True, only_before=True,
                            min_params=1),
    "REGISTER": Command(accounts.register, before_registration=True, min_params=2),
    # connection
    "PING": Command(queries.ping, before_registration=True),
    "PONG": Command(queries.pong, before_registration=True),
    "QUIT": Command(queries.quit, before_registration=True),
    # messaging
    "PRIVMSG": Command(messaging.privmsg),
    "NOTICE": Command(messaging.notice),
    "TAGMSG": Command(messaging.tagmsg),
    # channels
    "JOIN": Command(channels.join, min_params=1),
    "PART": Command(channels.part, min_params=1),
    "NAMES": Command(channels.names),
    "LIST": Command(channels.list_),
    "TOPIC": Command(channels.topic, min_params=1),
    "MODE": Command(channels.mode, min_params=1),
    "KICK": Command(channels.kick, min_params=2),
    "INVITE": Command(channels.invite),
    # server operators
    "OPER": Command(accounts.oper, min_params=2),
    "KILL": Command(accounts.kill, min_params=1),
    "WALLOPS": Command(accounts.wallops, min_params=1),
    # queries
    "WHO": Command(queries.who),
    "WHOIS": Command(queries.whois),
    "WHOWAS": Command(queries.whowas),
    "MONITOR": Command(monitor.monitor, min_params=1),
    "MARKREAD": Command(markread.markread),
    "SETNAME": Command(queries.setname, min_params=1),
    "MOTD": Command(queries.motd),
    "LUSERS": Command(queries.lusers),
    "AWAY": Command(queries.away),
    "USERHOST": Command(queries.userhost),
    "ISON": Command(queries.ison),
    "INFO": Command(queries.info),
    "TIME": Command(queries.time_),
    # history
    "CHATHISTORY": Command(history.chathistory),
}


HELP = {
    "AUTHENTICATE": "AUTHENTICATE PLAIN|SCRAM-SHA-256: log into an account (SASL, before registering)",
    "AWAY": "AWAY [text]: mark yourself away with text, or back without",
    "CAP": "CAP LS|REQ|LIST|END: capabilities",
    "CHATHISTORY": "CHATHISTORY LATEST|BEFORE|AFTER|AROUND|BETWEEN target refs limit",
    "HELP": "HELP [command]: this help",
    "INFO": "INFO: about this server",
    "INVITE": "INVITE nick #room: let nick join an invite-only room; INVITE alone: your invitations",
    "ISON": "ISON nick...: which of these are here",
    "JOIN": "JOIN #room[,#room] [key[,key]]; JOIN 0 leaves every room",
    "KICK": "KICK #room nick [reason]: operators only",
    "KILL": "KILL nick [reason]: server operators only",
    "LIST": "LIST [#room,...]: rooms and their sizes",
    "LUSERS": "LUSERS: how many are here",
    "MONITOR": "MONITOR +|- nick[,nick] | C | L | S: be told when nicks come and go",
    "MARKREAD": "MARKREAD target [timestamp=...]: where you have read up to (draft/read-marker)",
    "MODE": "MODE #room [+-imnstklovb args]; MODE #room b lists bans; MODE nick [+-i]",
    "MOTD": "MOTD: the message of the day",
    "NAMES": "NAMES #room: who is in it",
    "NICK": "NICK newnick",
    "NOTICE": "NOTICE target text: a message nothing may answer automatically",
    "OPER": "OPER account password: become a server operator (an --operators account)",
    "PART": "PART #room [reason]",
    "PASS": "PASS password: the server password, before NICK and USER",
    "PING": "PING token",
    "PONG": "PONG token",
    "PRIVMSG": "PRIVMSG target[,target] text: to rooms or nicks",
    "QUIT": "QUIT [reason]",
    "REGISTER": "REGISTER * * password: your nick becomes an account",
    "SETNAME": "SETNAME :real name: change your real name (setname)",
    "TAGMSG": "TAGMSG target: client tags only (message-tags)",
    "TIME": "TIME: the server's clock",
    "TOPIC": "TOPIC #room [text]: read or set the topic",
    "USER": "USER ident 0 * :real name",
    "USERHOST": "USERHOST nick...",
    "WALLOPS": "WALLOPS :text: to every connection with user mode +w (server operators only)",
    "WHO": "WHO mask|#room [%fields[,token]]",
    "WHOIS": "WHOIS nick",
    "WHOWAS": "WHOWAS nick [count]",
}

RPL_HELPSTART = 704
RPL_HELPTXT = 705
RPL_ENDOFHELP = 706
ERR_HELPNOTFOUND = 524


def help_(session: "IrcSession", line: Line) -> None:
    """HELP and HELPOP: a line per command of the table, or the one asked about."""
    subject = line.params[0].upper() if line.params else ""
    if not subject:
        session.numeric(RPL_HELPSTART, "*", "Commands of this server:")
        for name in sorted(COMMANDS):
            session.numeric(RPL_HELPTXT, "*", HELP.get(name, name))
        session.numeric(RPL_ENDOFHELP, "*", "End of /HELP")
        return
    text = HELP.get(subject)
    if text is None or subject not in COMMANDS:
        session.numeric(ERR_HELPNOTFOUND, subject[:32], "No help available on this topic")
        return
    session.numeric(RPL_HELPSTART, subject, text)
    session.numeric(RPL_ENDOFHELP, subject, "End of /HELP")


COMMANDS["HELP"] = COMMANDS["HELPOP"] = Command(help_, before_registration=False)


def run(session: "IrcSession", line: Line) -> None:
    """Check `line` against the table, then hand it to its handler."""
    command = COMMANDS.get(line.command)
    if command is None:
        session.numeric(N.ERR_UNKNOWNCOMMAND, line.command[:32], "Unknown command")
        return
    registered = session.user is not None
    if not registered and not command.before_registration:
        session.numeric(N.ERR_NOTREGISTERED, "You have not registered")
        return
    if registered and command.only_before:
        session.numeric(N.ERR_ALREADYREGISTERED, "You may not reregister")
        return
    if len(line.params) < command.min_params:
        session.numeric(N.ERR_NEEDMOREPARAMS, line.command, "Not enough parameters")
        return
    command.handler(session, line)
