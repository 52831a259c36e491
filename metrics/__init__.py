"""Inception features, FID / IS / KID, reference statistics and before/after reports.
Knows nothing of the training loop."""
