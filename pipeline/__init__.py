"""flowdistill orchestration: sources, decoding, shards, jobs and the CLI.

This package is the only one that touches files, processes and the environment.
"""
