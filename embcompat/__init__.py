"""embcompat: backward-compatible embedding model upgrades for vector search.

Core package: settings, the error tree and the service layer that the API, the CLI
and the workers share. The math lives in `adapters/`, records in `registry/`.
"""

__version__ = "0.1.0"
