"""The HexRay web lab server (FastAPI): typed requests, the CLI's JSON documents as answers."""
