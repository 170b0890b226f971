"""The endpoint: one authenticated port in front of every engine (README, "The endpoint").

`routes` decides what is served (pure), `server` and `upstream` speak HTTP/1.1 to clients and engines, `relay` carries
one request across, `gateway` puts them together; `auth`, `errors` and `stats` are what they share.
"""

from app.gateway.auth import TokenChecker
from app.gateway.gateway import Gateway, ModelRoute
from app.gateway.stats import RequestStats

__all__ = ["Gateway", "ModelRoute", "RequestStats", "TokenChecker"]
