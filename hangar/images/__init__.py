"""From an OCI image reference to what a guest boots from.

``reference`` parses image references; ``oci`` pulls (skopeo), reads configs and unpacks
(umoci); ``rootfs`` caches one ext4 rootfs per digest and copies it per machine; ``kernel``
finds or fetches the guest kernel; ``initramfs`` builds hangar's base initramfs and each
machine's initrd, which ``guest/init`` reads; ``run_config`` is what init is told;
``build`` makes small busybox images without docker. Every external command goes through
``runner``.
"""
