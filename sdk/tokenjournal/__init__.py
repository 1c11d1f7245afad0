"""tokenjournal: keep a device signed in."""
