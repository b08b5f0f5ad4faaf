"""What the guest's init is handed to configure its network: kernel command line words, read by
``configure_network`` in ``hangar/images/guest/init``. They are handed at launch (not baked into
the initrd), so the egress address may differ from one start to the next.

- ``hangar.mac=MAC``: the interface to configure is the one with this MAC;
- ``hangar.ip6=ADDR/LEN``: the private address and the prefix that is on-link (the org's /64
  on this host: the org's machines on other hosts of a fleet are reached through the gateway,
  which routes them to their host);
- ``hangar.gw6=ADDR``: the IPv6 default route (the bridge's link-local address);
- ``hangar.dns=ADDR``: the only ``nameserver`` of ``/etc/resolv.conf``;
- ``hangar.ip4=ADDR/LEN`` and ``hangar.gw4=ADDR``: the egress address and its gateway (absent
  on a host without egress).

Init also maps the machine's hostname to the private address in ``/etc/hosts``.
"""

from __future__ import annotations

from hangar.model.guest_contract import CmdlineKey as Key
from hangar.net.addressing import GATEWAY_LINK_LOCAL, HOST_PREFIX_LEN, AddressPlan
from hangar.net.attachment import Attachment


def guest_kernel_args(attachment: Attachment, plan: AddressPlan) -> list[str]:
    args = [
        f"{Key.NET_MAC}={attachment.mac}",
        f"{Key.NET_IP6}={attachment.ip6}/{HOST_PREFIX_LEN}",
        f"{Key.NET_GW6}={GATEWAY_LINK_LOCAL}",
        f"{Key.NET_DNS}={plan.dns_address}",
    ]
    if attachment.ip4 is not None:
        args += [
            f"{Key.NET_IP4}={attachment.ip4}/{plan.egress_subnet.prefixlen}",
            f"{Key.NET_GW4}={plan.egress_gateway}",
        ]
    return args
