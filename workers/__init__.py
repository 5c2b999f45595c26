"""Celery app and tasks: the upgrade's steps on workers, chunked and resumable. Tasks take
ids only; vectors travel through the vector store, never through Redis."""
