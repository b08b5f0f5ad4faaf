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

Init also maps the machine's hostname to the private address in ``/etc/hosts``. A sandbox
machine has no init of ours: its root folder gets the same two files
(:func:`guest_etc_files`), and its namespace's ``eth0`` the same addresses and routes
(:meth:`hangar.net.host.HostNetwork.namespace`).
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


RESOLV_CONF = "/etc/resolv.conf"
HOSTS = "/etc/hosts"
_LOCALHOST = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def guest_etc_files(attachment: Attachment, plan: AddressPlan, hostname: str) -> dict[str, str]:
    """``/etc/resolv.conf`` naming the private DNS service alone, and ``/etc/hosts`` mapping
    ``hostname`` to the machine's private address: what init writes in a VM."""
    return {
        RESOLV_CONF: f"nameserver {plan.dns_address}\n",
        HOSTS: f"{_LOCALHOST}{attachment.ip6}\t{hostname}\n",
    }
