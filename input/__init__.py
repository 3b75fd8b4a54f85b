"""Input pipelines: shipped digits, synthetic data, shared pipeline finishing."""
