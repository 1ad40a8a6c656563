"""What each scoring model returns and how its output becomes labels (pure)."""
