"""Celery workers: tasks, inference backends, the sweeper. Never imports Flask or `api`."""
