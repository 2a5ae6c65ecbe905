"""The two-host real-systemd test bed (see core.py)."""

from .core import HOSTS, Host, Testbed, TestbedError, leftovers

__all__ = ["HOSTS", "Host", "Testbed", "TestbedError", "leftovers"]
