"""The HTTP edge: middleware, dependencies, the one error-to-HTTP mapping, request bodies,
OpenAPI, and the /v1 routes. Handlers are thin: they decode, call the runtime, encode.
"""
