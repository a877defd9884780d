"""herd's data flow: read, filter, deduplicate, score, tokenize and pack (see pipeline.py)."""
