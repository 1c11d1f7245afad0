"""Reference grace-window auth server (aiohttp.web) for tests, samples and demos.

It speaks the Mana protocol (`/auth/*`) and OAuth 2.0 (`/oauth/token`, RFC 8628 device
flow), implements the seed backend's rotation rules (grace-window replay of the same pair,
reuse detection, family revocation), and in test mode exposes a movable clock, scripted
faults and counters under `/_test/*`. See `docs`/design section 6.
"""

from ._app import create_app
from ._config import ServerConfig
from ._reference import ReferenceServer
from ._serve import add_serve_arguments, config_from_args, run

__all__ = [
    "ReferenceServer",
    "ServerConfig",
    "add_serve_arguments",
    "config_from_args",
    "create_app",
    "run",
]
