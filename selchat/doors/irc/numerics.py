"""The IRC numeric replies the gateway sends, as named constants with default texts.

Numbers follow the Modern IRC documents (https://modern.ircdocs.horse/). One exception:
``ERR_BADCHANNAME`` (479) is not in them; it is what ircd-hybrid, ratbox and solanum send
for an illegal channel name, and what the IRC door answers for a refused room name.

Public API
----------
* ``Numeric``: an ``IntEnum`` (``Numeric.RPL_WELCOME == 1``); every member is also a module
  constant (``numerics.RPL_WELCOME``). ``parser.format_line`` writes an int command as three
  digits, so ``format_line(Numeric.RPL_WELCOME, ...)`` gives ``001``.
* ``DEFAULT_TEXT: dict[Numeric, str]``: the usual human-readable last parameter, for the
  numerics that end in one. Numerics whose last parameter is data (a topic, a name list, a
  mode string...) have no entry.
* ``numeric(code, server, target, *params, text=None, tags=None) -> bytes``: the whole wire
  line ``:server CODE target params... :text``; ``text`` defaults to ``DEFAULT_TEXT[code]``
  when there is one, else nothing is appended. ``target`` is the client's nick (``*`` before
  registration).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Dict, Optional

from selchat.doors.irc.parser import format_line

__all__ = ["Numeric", "DEFAULT_TEXT", "numeric"]


class Numeric(IntEnum):
    RPL_WELCOME = 1
    RPL_YOURHOST = 2
    RPL_CREATED = 3
    RPL_MYINFO = 4
    RPL_ISUPPORT = 5
    RPL_UMODEIS = 221
    RPL_LUSERCLIENT = 251
    RPL_LUSEROP = 252
    RPL_LUSERUNKNOWN = 253
    RPL_LUSERCHANNELS = 254
    RPL_LUSERME = 255
    RPL_LOCALUSERS = 265
    RPL_GLOBALUSERS = 266
    RPL_AWAY = 301
    RPL_USERHOST = 302
    RPL_ISON = 303
    RPL_UNAWAY = 305
    RPL_NOWAWAY = 306
    RPL_WHOISUSER = 311
    RPL_WHOISSERVER = 312
    RPL_ENDOFWHO = 315
    RPL_WHOISIDLE = 317
    RPL_ENDOFWHOIS = 318
    RPL_WHOISCHANNELS = 319
    RPL_LISTSTART = 321
    RPL_LIST = 322
    RPL_LISTEND = 323
    RPL_CHANNELMODEIS = 324
    RPL_CREATIONTIME = 329
    RPL_NOTOPIC = 331
    RPL_TOPIC = 332
    RPL_TOPICWHOTIME = 333
    RPL_INVITING = 341
    RPL_WHOREPLY = 352
    RPL_NAMREPLY = 353
    RPL_BANLIST = 367
    RPL_ENDOFBANLIST = 368
    RPL_ENDOFNAMES = 366
    RPL_MOTD = 372
    RPL_MOTDSTART = 375
    RPL_ENDOFMOTD = 376
    RPL_YOUREOPER = 381
    ERR_NOSUCHNICK = 401
    ERR_NOSUCHSERVER = 402
    ERR_NOSUCHCHANNEL = 403
    ERR_CANNOTSENDTOCHAN = 404
    ERR_TOOMANYCHANNELS = 405
    ERR_TOOMANYTARGETS = 407
    ERR_NOORIGIN = 409
    ERR_INVALIDCAPCMD = 410
    ERR_NORECIPIENT = 411
    ERR_NOTEXTTOSEND = 412
    ERR_INPUTTOOLONG = 417
    ERR_UNKNOWNCOMMAND = 421
    ERR_NOMOTD = 422
    ERR_NONICKNAMEGIVEN = 431
    ERR_ERRONEUSNICKNAME = 432
    ERR_NICKNAMEINUSE = 433
    ERR_USERNOTINCHANNEL = 441
    ERR_NOTONCHANNEL = 442
    ERR_USERONCHANNEL = 443
    ERR_NOTREGISTERED = 451
    ERR_NEEDMOREPARAMS = 461
    ERR_ALREADYREGISTERED = 462
    ERR_PASSWDMISMATCH = 464
    ERR_CHANNELISFULL = 471
    ERR_UNKNOWNMODE = 472
    ERR_INVITEONLYCHAN = 473
    ERR_BANNEDFROMCHAN = 474
    ERR_BADCHANNELKEY = 475
    ERR_BANLISTFULL = 478
    ERR_BADCHANNAME = 479
    ERR_NOPRIVILEGES = 481
    ERR_CHANOPRIVSNEEDED = 482
    ERR_NOOPERHOST = 491
    ERR_UMODEUNKNOWNFLAG = 501
    ERR_USERSDONTMATCH = 502
    ERR_INVALIDMODEPARAM = 696


globals().update(Numeric.__members__)  # numerics.RPL_WELCOME etc. as plain module names
__all__ += list(Numeric.__members__)

N = Numeric
DEFAULT_TEXT: Dict[Numeric, str] = {
    N.RPL_WELCOME: "Welcome to selchat",
    N.RPL_YOURHOST: "Your host is selchat",
    N.RPL_CREATED: "This server is running",
    N.RPL_ISUPPORT: "are supported by this server",
    N.RPL_LUSERCLIENT: "There are users on this server",
    N.RPL_LUSEROP: "operators online",
    N.RPL_LUSERUNKNOWN: "connections not registered yet",
    N.RPL_LUSERCHANNELS: "channels formed",
    N.RPL_LUSERME: "I have clients and no other servers",
    N.RPL_LOCALUSERS: "Current local users",
    N.RPL_GLOBALUSERS: "Current global users",
    N.RPL_UNAWAY: "You are no longer marked as away",
    N.RPL_NOWAWAY: "You are now marked as away",
    N.RPL_WHOISIDLE: "seconds idle, signon time",
    N.RPL_ENDOFWHO: "End of WHO list",
    N.RPL_ENDOFWHOIS: "End of WHOIS list",
    N.RPL_LISTSTART: "Users  Name",
    N.RPL_LISTEND: "End of LIST",
    N.RPL_NOTOPIC: "No topic is set",
    N.RPL_ENDOFNAMES: "End of NAMES list",
    N.RPL_MOTDSTART: "Message of the day",
    N.RPL_ENDOFMOTD: "End of MOTD",
    N.ERR_NOSUCHNICK: "No such nick or channel",
    N.ERR_NOSUCHSERVER: "No such server",
    N.ERR_NOSUCHCHANNEL: "No such channel",
    N.ERR_CANNOTSENDTOCHAN: "Cannot send to channel",
    N.ERR_TOOMANYCHANNELS: "You have joined too many channels",
    N.ERR_TOOMANYTARGETS: "Too many targets",
    N.ERR_NOORIGIN: "No origin given",
    N.ERR_NORECIPIENT: "No recipient given",
    N.ERR_NOTEXTTOSEND: "No text to send",
    N.ERR_INPUTTOOLONG: "Input line was too long",
    N.ERR_UNKNOWNCOMMAND: "Unknown command",
    N.ERR_NOMOTD: "There is no MOTD",
    N.ERR_NONICKNAMEGIVEN: "No nickname given",
    N.ERR_ERRONEUSNICKNAME: "Erroneous nickname",
    N.ERR_NICKNAMEINUSE: "Nickname is already in use",
    N.ERR_USERNOTINCHANNEL: "They are not on that channel",
    N.ERR_NOTONCHANNEL: "You are not on that channel",
    N.ERR_NOTREGISTERED: "You have not registered",
    N.ERR_NEEDMOREPARAMS: "Not enough parameters",
    N.ERR_ALREADYREGISTERED: "You may not register again",
    N.ERR_PASSWDMISMATCH: "Password incorrect",
    N.ERR_BADCHANNAME: "Illegal channel name",
    N.ERR_CHANOPRIVSNEEDED: "You are not a channel operator",
    N.ERR_UMODEUNKNOWNFLAG: "Unknown MODE flag",
    N.ERR_USERSDONTMATCH: "Cannot change mode for other users",
}
del N


def numeric(
    code: Numeric,
    server: str,
    target: str,
    *params: str,
    text: Optional[str] = None,
    tags: Optional[Dict[str, str]] = None,
) -> bytes:
    """``:server CODE target params... :text`` as one wire line (see the module docstring)."""
    if text is None:
        text = DEFAULT_TEXT.get(code)
    if text is None:
        return format_line(code, target, *params, source=server, tags=tags)
    return format_line(code, target, *params, text, source=server, tags=tags, trailing=True)
