"""hangar: self-hosted GPU Machines."""

__version__ = "0.1.0"
