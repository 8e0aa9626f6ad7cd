"""Streaming sessions: the SessionManager (slots, positions, offsets, TTLs), a session's state,
its durable record, and the hooks a session store plugs into.

Above service.models; knows no store implementation and no HTTP.
"""
