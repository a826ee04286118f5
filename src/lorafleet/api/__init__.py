"""HTTP edge: FastAPI routes, auth, and the one map from lorafleet errors to status codes."""
