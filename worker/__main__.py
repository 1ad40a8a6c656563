"""`python -m worker`: run a Celery worker consuming the image queue with the settings from the environment."""

from __future__ import annotations

from worker.worker_main import main

if __name__ == "__main__":
    main()
