"""Entry point for `celery -A workers.main worker` (the one place an app is built at import:
the Celery command line needs an instance)."""

from embcompat.settings import get_settings
from embcompat.workers.app import create_app

app = create_app(get_settings())
