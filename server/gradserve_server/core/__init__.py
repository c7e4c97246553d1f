"""The gradserve core: models, sessions, training. Knows nothing of gRPC."""
