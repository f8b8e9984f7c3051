"""lczfs-unlockd: unlock an encrypted ZFS root from a LUKS keystore on a zvol."""

__version__ = "0.1.0"
