"""The worker: Celery tasks that download, check, score and record one image each, and their adapters."""
