"""Archived images: download (download.py), verification (verify.py) and storage (store.py)."""
