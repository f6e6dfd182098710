"""Preference data: read and validate rows, tokenize with chat templates, and batch."""
