"""The MMSD training layer (python -m mmsd_ext.train)."""
