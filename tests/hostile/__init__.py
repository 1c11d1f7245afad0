"""Hostile-input suite: misbehaving servers, tampered journals, signals."""
