"""reconnectd's benchmark: ``bench/run`` measures the real daemon on this machine."""
