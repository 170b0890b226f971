"""The endpoint: one authenticated port in front of every engine (docs/serving.md, "The endpoint").

`routes` decides what is served (pure), `server`, `reader` and `upstream` speak HTTP/1.1 to clients and engines,
`connections` keeps the table of client connections, `relay` carries one request across, `model_routes` is each
model behind it, `keys` is each caller's key and its limits, `bodies` what a key's requests get written in,
`gateway` puts them together; `auth`, `errors` and `stats` are what they share.
"""

from app.gateway.gateway import Gateway, GatewayLimits
from app.gateway.keys import KeyRing
from app.gateway.model_routes import ModelRoute
from app.gateway.stats import RequestStats

__all__ = ["Gateway", "GatewayLimits", "KeyRing", "ModelRoute", "RequestStats"]
