"""The selchat terminal client.

`session` is the sans-I/O core (lines in, requests out; events in, display items out),
`render` turns those items into text safe for a terminal, `connection` owns the socket,
and `app` wires them into the interactive and script modes.
"""
