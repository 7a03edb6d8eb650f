"""Formats at the bottom: weight block formats and the packed-checkpoint layout, as data (imports nothing of the runtime)."""
