"""The HTTP server on top of `service.runtime`: app, routes, batching, auth, metrics, UI."""
