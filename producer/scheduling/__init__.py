"""Schedules: score a container's new and changed images on a timetable, kept in Redis, fired by `blobscore beat`."""
