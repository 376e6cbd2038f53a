"""OpenAI-compatible HTTP server (`omnikv serve`).

`create_app(engine, ...)` builds the FastAPI app around anything implementing `EngineLike`;
`Engine` adapts a loaded model + KV method to it; `ServerThread` runs an app on a loopback port in a
background thread (tests, notebooks).
"""

from omnikv.server.app import create_app
from omnikv.server.protocol import ChatMessage, EngineLike, EngineResult, GenRequest
from omnikv.server.runner import ServerThread

__all__ = ["ChatMessage", "Engine", "EngineLike", "EngineResult", "GenRequest", "ServerThread", "create_app"]


def __getattr__(name: str):  # `Engine` imports torch-side modules; load it only when asked for
    if name == "Engine":
        from omnikv.server.engine import Engine

        return Engine
    raise AttributeError(name)
