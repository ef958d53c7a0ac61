"""Preference data: the Pick-a-Pic reader, image decoding and the pre-encoded pair cache."""
