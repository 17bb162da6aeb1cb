"""The published model put to use: scoring images with the champion (``predict``)."""
