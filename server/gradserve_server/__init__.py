"""gradserve server: PyTorch models behind a gRPC gradient service."""

__all__ = ["Settings", "build_server"]


def __getattr__(name: str) -> object:  # lazy: importing the package starts nothing
    if name == "build_server":
        from .app import build_server

        return build_server
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(name)
