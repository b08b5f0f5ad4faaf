"""hangar's host networking: every org's private IPv6 network (Fly's 6PN) on each host.

- :mod:`hangar.net.addressing`: the address plan (ULA prefix, org /48, org-on-host /64, a
  machine's ``private_ip`` and MAC, the DNS address, the egress subnet);
- :mod:`hangar.net.attachment`: a machine's place on the host network, kept in its tap's alias;
- :mod:`hangar.net.links`: the bridge and taps over netlink (pyroute2);
- :mod:`hangar.net.firewall`: the nftables ruleset (isolation, anti-spoofing, host ports,
  egress NAT), rendered whole and replaced atomically;
- :mod:`hangar.net.dns`: the internal DNS service (``<app>.internal`` and friends);
- :mod:`hangar.net.guest`: what the guest's init is handed;
- :mod:`hangar.net.host`: :class:`~hangar.net.host.HostNetwork`, the operations the agent's
  steps call (each with its "should I run?" check) and reconciliation.

Forwarding: hangar turns on IPv4 forwarding on its bridge and on the egress interface only
(for egress NAT); it never sets ``net.ipv4.ip_forward`` nor IPv6 forwarding: machines of one org
on one host talk over the bridge, and the host's services are local.
"""
