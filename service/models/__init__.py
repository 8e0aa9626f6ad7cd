"""The served models: the registry, the worker thread that micro-batches a model's steps,
whole-sequence inference, and the input spec every edge decodes against.

Imports model/ and service.protocol; knows no sessions and no HTTP.
"""
