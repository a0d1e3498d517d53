"""reconnectd's exit codes, promised in the contract (sysexits.h where one fits)."""

OK = 0
# `check --online`: a present printer's port or profile is not what its OctoPrint offers;
# `status`: the status file cannot be read or is invalid.
FINDING = 1
NOT_RUNNING = 3  # `status` with no daemon running, as `systemctl status` says it
USAGE = 64
UNAVAILABLE = 69  # a host unreachable (`check --online`, `login`); udev's netlink (`run`)
CANTCREAT = 73  # `login`: the key file cannot be written
NOPERM = 77  # the key rejected or lacking permission
CONFIG = 78
INTERRUPTED = 130  # `login` stopped by Ctrl-C, as a shell reports it
