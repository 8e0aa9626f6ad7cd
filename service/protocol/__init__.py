"""What the server and its clients agree on: error codes, domain errors, wire frames, limits.

The bottom layer: it imports nothing else of tcnserve (the client wheel ships part of it).
"""
