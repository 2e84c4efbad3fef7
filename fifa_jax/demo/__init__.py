"""The demo world's models and measurements."""
