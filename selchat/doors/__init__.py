"""Front doors: one package per wire protocol, each a session over a transport."""
