"""The endpoint: one authenticated port in front of every engine (README, "The endpoint").

`routes` decides what is served (pure), `server`, `reader` and `upstream` speak HTTP/1.1 to clients and engines,
`connections` keeps the table of client connections, `relay` carries one request across, `model_routes` is each
model behind it, `gateway` puts them together; `auth`, `errors` and `stats` are what they share.
"""

from app.gateway.auth import TokenChecker
from app.gateway.gateway import Gateway, GatewayLimits
from app.gateway.model_routes import ModelRoute
from app.gateway.stats import RequestStats

__all__ = ["Gateway", "GatewayLimits", "ModelRoute", "RequestStats", "TokenChecker"]
