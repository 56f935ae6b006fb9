"""`gpuload bench`: gpuload against the loaders people use today, on the same shards, in one run.

dataset.py keeps the cached demo dataset, providers.py holds one class per loader, runner.py times them
and prints the table (and writes JSON), plot.py draws the PNG chart.
"""


class BenchError(ValueError):
    """A problem the user can fix (arguments, data, output paths): shown as one line by the CLI."""
