"""The IRC door: RFC 1459/2812 with IRCv3 capabilities, into the same rooms (docs/irc.md)."""
