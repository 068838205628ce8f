"""The chat itself: users, rooms, requests, events, history and rules; no sockets, clocks or wire formats."""
