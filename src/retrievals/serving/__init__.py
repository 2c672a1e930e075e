"""OpenAI-compatible embedding server: ``create_app(model, config)`` and ``serve(app, host, port)``.

Needs the ``serve`` extra (``pip install retrievals[serve]``: FastAPI and uvicorn).
"""

from .app import create_app
from .config import ServerConfig
from .server import BackgroundServer, bind_socket, serve

__all__ = ["create_app", "ServerConfig", "serve", "bind_socket", "BackgroundServer"]
