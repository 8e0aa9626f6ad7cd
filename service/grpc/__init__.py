"""The Open Inference Protocol over gRPC, beside HTTP (docs/grpc.md)."""
