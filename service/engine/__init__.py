"""The engine boundary: the process that owns the models and the sessions, and its edges.

An engine (the StreamPools, their worker threads, the SessionManager, the session store's
durability) runs either in the edge's own process (`tcnserve serve --workers 0`, tests) or as a
process of its own that every edge process talks to over a Unix socket in the typed messages of
`messages.py` (`tcnserve serve --workers N`, N >= 1). Edges speak the protocols (HTTP, WebSocket,
/v2) and decode requests; the engine batches every edge's pushes into one model call.

- messages.py: the requests and outcomes that cross the boundary, and the frame format.
- server.py: the engine process's side: answers each request with the SessionManager.
- client.py: the edge's side: the SessionManager and ModelRegistry surface, over the socket.
- supervisor.py: `tcnserve serve --workers N`: the engine process, N edges, restarts, drain.
"""
