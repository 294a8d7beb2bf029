"""Input and output: configs, loading the user's code and data, dumps and config scaffolding."""
