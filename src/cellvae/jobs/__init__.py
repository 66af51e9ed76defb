"""What the command line runs and writes: the fit jobs, the analysis commands, evaluation and the report."""
