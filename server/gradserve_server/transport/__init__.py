"""The only package that imports grpc: servicer, interceptors, error mapping."""
