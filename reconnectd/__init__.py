"""reconnectd: reconnects OctoPrint to a USB printer that comes back, only when that is safe."""

__version__ = "0.1.0"
