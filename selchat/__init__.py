"""selchat: a multi-user chat server built on one selectors loop."""

__version__ = "0.1.0"
SERVER_NAME = f"selchat/{__version__}"
