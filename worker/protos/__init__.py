"""Generated lean TF-Serving wire messages (package blobscore.wire); regenerate with regenerate.sh."""
