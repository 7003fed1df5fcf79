"""The secure channel over TCP: the I/O shell around :mod:`ctlive.protocol`.

``socket`` (non-blocking sockets and the mapping of OS errors), ``link`` (one
connection's record streams), ``session`` (a migration session over its lanes),
``client`` (:func:`open_session`) and ``server`` (:func:`serve_sessions`, with its
limits against hostile peers: handshakes and sessions at once, handshake and idle
timeouts, descriptor exhaustion). It runs unchanged under asyncio and trio (anyio).
"""
