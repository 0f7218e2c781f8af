"""mobilize.compiler: CLI, checkpoint sources, architecture builders and the pipeline driver."""

__version__ = "0.1.0"
