"""The internal admin API (FastAPI): thin routes over the service layer."""
