"""Generated protobuf/gRPC code for proto/specrelay/v1 (regenerate with `make proto`)."""
