"""The WebSocket edge: /v1/sessions/{id}/stream and /v1/streams, and the uvicorn protocol that
tells them when a connection is gone.
"""
