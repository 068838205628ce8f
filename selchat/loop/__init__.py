"""The event loop as a small library: selector, timers, transports, listeners; it knows nothing of chat."""
