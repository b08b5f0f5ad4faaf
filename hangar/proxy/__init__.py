"""hangar's proxy: publishes apps' service ports on the host (HTTP by Host, TLS by SNI, raw TCP
and UDP), balances over started machines by load, wakes stopped ones, stops idle ones.

The one seam to the rest of hangar is ``hangar.proxy.backends.Backends``.
"""
