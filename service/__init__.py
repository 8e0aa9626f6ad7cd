"""tcnserve's service layer: FastAPI app, session manager, micro-batcher, CLI."""
