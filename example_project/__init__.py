"""Example projects: a Django site and a FastAPI app metered with litewave-meter."""
