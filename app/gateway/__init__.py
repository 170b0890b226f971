"""The endpoint: one authenticated port in front of every engine (README, "The endpoint")."""

from app.gateway.auth import TokenChecker
from app.gateway.proxy import Gateway, ModelRoute
from app.gateway.stats import RequestStats

__all__ = ["Gateway", "ModelRoute", "RequestStats", "TokenChecker"]
