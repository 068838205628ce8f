"""What an operator needs around the chat server: metrics, the config file, reload, systemd.

Nothing here is on the path of a chat message: the metrics read at scrape time what the
server keeps anyway, plus a few counters at points that run once per request or per pass.
"""
