"""The fints server: OpenAI-compatible, personalized generation with a durable per-user store.

Build an app with :func:`create_app` (no global state), or run ``fints serve``
(``python -m fints.serving``).
"""

from fints.serving.app import ServerConfig, create_app
from fints.serving.payloads import Limits

__all__ = ["Limits", "ServerConfig", "create_app"]
