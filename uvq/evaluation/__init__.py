"""Evaluation: feature sets, set metrics (FID/KID/PRDC), reconstruction metrics, nearest neighbours."""
