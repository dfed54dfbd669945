"""Evaluation: episodes with 95% intervals, robust evaluation, gradient-masking checks, randomized-smoothing certificates, Lake's runs, trained runs, comparison tables and plots."""
