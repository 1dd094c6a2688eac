"""Fixtures recorded from the official AdderNet code (PyTorch), and the generators they share."""
