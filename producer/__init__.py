"""The producer side: the blobscore CLI, enqueueing and the listing carrier, schedules, status, reports, exporter."""
