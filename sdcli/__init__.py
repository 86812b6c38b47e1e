"""sdcli: Stable Diffusion from the command line, on numpy, without PyTorch."""

__version__ = "0.1.0"
