"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP API) at /v2, served by the same
sessions and models as /v1.
"""
