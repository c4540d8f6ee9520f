"""Evaluation: sample sets, Inception features, references, FID/KID with
intervals, sweeps, compare, reports."""
